"""Backup chains, end to end on managed volumes with ext4 in use: a full, then incrementals that
hold only what changed, every chain point restorable exactly, consolidated into fulls stock zstd
restores, across crashes, failed backups and detach/attach.

The oracle follows QEMU's iotest 257: each round writes (files rewritten in place, appended,
created, deleted, fio's random 4K writes into a big file), takes an incremental, and keeps a
copy of the snapshot view the backup read: restoring that chain point must give exactly those
bytes (cmp), and so must `zstd -d` of its consolidated full.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from devices import loop
from imager import jobs
from imager.catalog import Catalog
from imager.format import ImageReader
from imager.errors import CacheFullError
from imager.snapshot import daemon
from imager.snapshot.cow.tracker import TRACKING_ENV, TRACKING_OFF

from conftest import REPO_ROOT, fsck_clean, writing_into
from lab import DAEMON_TESTS, MiB, WAIT, damage_chunk, imager, kill_and_wait, one_line_error, umount_point, partitioned_disk, wait_until

pytestmark = DAEMON_TESTS

VOLUME = 96 * MiB
ALL_BLOCKS = jobs.ImagingOptions(all_blocks=True, chunk_size=1 << 20)


class ViewCopy:
    """A progress callback that, at the first chunk (the snapshot taken, the volume in use),
    copies the snapshot view the backup is reading, then writes to the live filesystem: those
    writes must be in the next chain point, not this one."""

    def __init__(self, name: str, path, then=None):
        self.name, self.path, self.then, self.done = name, str(path), then, False

    def __call__(self, n: int) -> None:
        if self.done:
            return
        self.done = True
        snapshot = daemon.status(self.name).snapshot
        assert snapshot is not None
        shutil.copyfile(snapshot.path, self.path)
        if self.then:
            self.then()


def seed(mnt: str, rng: random.Random) -> None:
    os.makedirs(os.path.join(mnt, "docs"))
    for i in range(40):
        with open(os.path.join(mnt, "docs", f"f{i:03d}.txt"), "wb") as f:
            f.write((b"line %d of file %d\n" % (rng.randrange(10 ** 6), i)) * rng.randrange(10, 4000))
    with open(os.path.join(mnt, "data.bin"), "wb") as f:
        f.write(rng.randbytes(12 * MiB))
    with open(os.path.join(mnt, "big.bin"), "wb") as f:
        f.write(bytes(16 * MiB))
    os.sync()


def seeded_with_full(bench, name: str, seed_value: int):
    """A managed volume with seeded ext4 on its front and a full image of it in `out`:
    (volume, mount point, the seed's generator for the writes that follow, out)."""
    vol, _, mnt = bench.ext4_volume(name, VOLUME)
    rng = random.Random(seed_value)
    seed(mnt, rng)
    out = bench.tmp / "out"
    out.mkdir()
    backup(name, out / "full.zst", incremental=False)
    return vol, mnt, rng, out


def mutate(mnt: str, rng: random.Random, round_: int) -> None:
    """A night's writes: in place, appended, created, deleted, and random 4K writes by fio."""
    docs = os.path.join(mnt, "docs")
    names = sorted(os.listdir(docs))
    for name in rng.sample(names, 5):
        path = os.path.join(docs, name)
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.seek(rng.randrange(max(1, size)))
            f.write(rng.randbytes(rng.randrange(1, 64 << 10)))
    with open(os.path.join(docs, rng.choice(names)), "ab") as f:
        f.write(b"appended in round %d\n" % round_ * rng.randrange(100, 5000))
    os.unlink(os.path.join(docs, rng.choice(names)))
    with open(os.path.join(docs, f"new{round_}.txt"), "wb") as f:
        f.write(rng.randbytes(rng.randrange(4096, 2 * MiB)))
    with open(os.path.join(mnt, "data.bin"), "r+b") as f:
        f.seek(rng.randrange(12 * MiB))
        f.write(rng.randbytes(200 << 10))
    subprocess.run(["fio", "--name=night", f"--filename={os.path.join(mnt, 'big.bin')}", "--rw=randwrite",
                    "--bs=4k", "--size=16M", "--io_size=1M", "--direct=1", f"--randseed={round_ + 1}",
                    "--output-format=terse"], check=True, capture_output=True)


def same(a, b) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def unzstd(image, out) -> str:
    subprocess.run(["zstd", "-dqf", str(image), "-o", str(out)], check=True)
    return str(out)


def backup(name: str, output, *, incremental: bool, options=ALL_BLOCKS, progress=None, **kw):
    with Catalog() as catalog:
        opts = jobs.ImagingOptions(**{**options.__dict__, "incremental": incremental})
        (result,) = jobs.backup_volumes([name], jobs.Destination(output=str(output)), snapshot="cow", options=opts,
                                        progress=progress, catalog=catalog, **kw)
    return result


def restore(image, target) -> None:
    with Catalog() as catalog:
        jobs.restore(str(image), str(target), catalog=catalog)


@pytest.mark.skipif(shutil.which("fio") is None, reason="needs fio")
def test_every_chain_point_restores_exactly_the_snapshot(bench):
    vol, source, mnt = bench.ext4_volume("chain", VOLUME)
    rng = random.Random(257)
    seed(mnt, rng)
    out = bench.tmp / "out"
    out.mkdir()
    points = []
    for round_ in range(6):
        if round_:
            mutate(mnt, rng, round_)
        reference = out / f"view{round_}.raw"
        during = lambda r=round_: mutate(mnt, random.Random(1000 + r), 100 + r)   # noqa: E731
        result = backup("chain", out / f"p{round_}.zst", incremental=round_ > 0, progress=ViewCopy("chain", reference,
                        during))
        if round_ == 0:
            assert result.kind == "full"
        else:
            assert result.kind == "incremental" and result.method == "tracker", result.reason
            assert result.parent_id == points[-1][1].image_id
            # only what changed: far less than the volume
            assert result.bytes_written < VOLUME // 4, result.bytes_written
        points.append((out / f"p{round_}.zst", result, reference))
    for image, result, reference in points:
        restored = out / "restored.raw"
        restore(image, restored)
        assert same(restored, reference), f"restoring {image.name} does not give its snapshot"
        os.unlink(restored)
        if result.kind == "incremental":
            with Catalog() as catalog:
                jobs.consolidate(str(image), jobs.Destination(output=str(out / "full.zst"), force=True),
                                 catalog=catalog)
            assert same(unzstd(out / "full.zst", out / "full.raw"), reference), f"consolidated {image.name} differs"
            os.unlink(out / "full.raw")
    # the live volume holds everything written, the writes during the last backup included
    umount_point(mnt)
    assert fsck_clean(vol.front).returncode == 0


@pytest.mark.skipif(shutil.which("fio") is None, reason="needs fio")
def test_used_block_chains_restore_what_a_full_of_the_snapshot_holds(bench, tmp_path):
    """Without --all-blocks unused blocks are zeros: a chain point must equal a full image of the
    same snapshot (taken from the copy of its view), block for block, also where files were
    deleted and space reused."""
    vol, source, mnt = bench.ext4_volume("used", VOLUME)
    rng = random.Random(7)
    seed(mnt, rng)
    out = bench.tmp / "out"
    out.mkdir()
    options = jobs.ImagingOptions(chunk_size=1 << 20)
    for round_ in range(3):
        if round_:
            mutate(mnt, rng, round_)
        view = out / f"view{round_}.raw"
        result = backup("used", out / f"u{round_}.zst", incremental=round_ > 0, options=options,
                        progress=ViewCopy("used", view))
        assert result.kind == ("incremental" if round_ else "full")
        expected = jobs.backup(str(view), str(out / "of-view.zst"), force=True, options=options)
        assert expected.header.plan["mode"] == "used-blocks"
        restored = out / "restored.raw"
        restore(out / f"u{round_}.zst", restored)
        assert same(restored, unzstd(out / "of-view.zst", out / "of-view.raw")), f"round {round_}"
        assert fsck_clean(str(restored)).returncode == 0
        for leftover in (restored, out / "of-view.raw", out / "of-view.zst"):
            os.unlink(leftover)


def test_a_killed_daemon_makes_the_next_incremental_use_digests(bench):
    vol, mnt, rng, out = seeded_with_full(bench, "crash", 3)
    with open(os.path.join(mnt, "data.bin"), "r+b") as f:
        f.write(rng.randbytes(1 * MiB))
        os.fsync(f.fileno())
    kill_and_wait(vol.pid)
    umount_point(mnt)
    recovered = imager("recover", "crash", "--json")
    assert recovered.returncode == 0, recovered.stderr
    bench.adopt("crash")
    vol = daemon.status("crash")
    mnt = bench.mount(vol.front, "mnt-again")
    with open(os.path.join(mnt, "after-crash.bin"), "wb") as f:
        f.write(rng.randbytes(2 * MiB))
    view = out / "view.raw"
    result = backup("crash", out / "inc.zst", incremental=True, progress=ViewCopy("crash", view))
    assert result.kind == "incremental" and result.method == "digest"
    assert "did not stop cleanly" in result.reason, result.reason
    restore(out / "inc.zst", out / "restored.raw")
    assert same(out / "restored.raw", view)
    shown = imager("info", str(out / "inc.zst"))
    assert "by digest: the change tracker started anew" in shown.stdout, shown.stdout
    # and the next one trusts the tracker again: it starts from the image the digests made
    with open(os.path.join(mnt, "after-crash.bin"), "r+b") as f:
        f.write(rng.randbytes(4096))
    view2 = out / "view2.raw"
    again = backup("crash", out / "inc2.zst", incremental=True, progress=ViewCopy("crash", view2))
    assert again.method == "tracker", again.reason
    restore(out / "inc2.zst", out / "restored2.raw")
    assert same(out / "restored2.raw", view2)


def test_with_change_tracking_off_every_incremental_compares_digests(bench, monkeypatch):
    monkeypatch.setenv(TRACKING_ENV, "off")             # the daemon started by attach inherits it
    vol, mnt, rng, out = seeded_with_full(bench, "untracked", 5)
    for n in range(2):                                  # not only the first one after attach
        with open(os.path.join(mnt, "data.bin"), "r+b") as f:
            f.seek(n * 4 * MiB)
            f.write(rng.randbytes(1 * MiB))
        view = out / f"view{n}.raw"
        result = backup("untracked", out / f"inc{n}.zst", incremental=True, progress=ViewCopy("untracked", view))
        assert result.method == "digest" and TRACKING_OFF in result.reason, result.reason
        restore(out / f"inc{n}.zst", out / f"restored{n}.raw")
        assert same(out / f"restored{n}.raw", view)


def test_a_live_upgrade_keeps_the_tracker_and_a_killed_worker_does_not(bench):
    vol, mnt, rng, out = seeded_with_full(bench, "upgrade", 4)
    with open(os.path.join(mnt, "data.bin"), "r+b") as f:
        f.write(rng.randbytes(1 * MiB))
    restarted = imager("volumes", "restart", "upgrade", "--json")
    assert restarted.returncode == 0, restarted.stderr
    (shown,) = json.loads(restarted.stdout)["volumes"]
    assert shown["worker"]["restarts"] == 1 and shown["worker"]["pid"] != vol.worker["pid"]
    with open(os.path.join(mnt, "data.bin"), "r+b") as f:
        f.seek(4 * MiB)
        f.write(rng.randbytes(1 * MiB))

    def upgrade_while_reading():           # the worker is replaced during the backup, too
        daemon.restart_worker("upgrade")
        with open(os.path.join(mnt, "data.bin"), "r+b") as f:
            f.seek(8 * MiB)
            f.write(rng.randbytes(1 * MiB))

    points = []
    for n, then in enumerate((None, upgrade_while_reading, None)):
        view = out / f"view{n}.raw"
        result = backup("upgrade", out / f"inc{n}.zst", incremental=True, progress=ViewCopy("upgrade", view, then))
        assert result.method == "tracker", result.reason
        points.append((out / f"inc{n}.zst", view))
    assert daemon.status("upgrade").worker["restarts"] == 2
    kill_and_wait(daemon.status("upgrade").worker["pid"])
    with open(os.path.join(mnt, "after-kill.bin"), "wb") as f:
        f.write(rng.randbytes(2 * MiB))
    view = out / "view-kill.raw"
    killed = backup("upgrade", out / "inc-kill.zst", incremental=True, progress=ViewCopy("upgrade", view))
    assert killed.method == "digest" and "did not stop cleanly" in killed.reason, killed.reason
    points.append((out / "inc-kill.zst", view))
    for n, (image, view) in enumerate(points):
        restore(image, out / f"restored{n}.raw")
        assert same(out / f"restored{n}.raw", view), image


def digests_restore_exactly(name: str, out, tag: str, offset: int, expected: bytes,
                            why: str = "written outside the front") -> None:
    """The next incremental of volume `name` compares digests, saying `why`, and its restore is
    the snapshot byte for byte, `expected` at `offset` included."""
    view, image, restored = out / f"view-{tag}.raw", out / f"i-{tag}.zst", out / f"r-{tag}.raw"
    result = backup(name, image, incremental=True, progress=ViewCopy(name, view))
    assert result.method == "digest" and why in result.reason, result.reason
    restore(image, restored)
    assert same(restored, view)
    with open(restored, "rb") as f:
        f.seek(offset)
        assert f.read(len(expected)) == expected


def test_a_write_to_the_source_past_the_front_while_attached_is_never_missed(bench):
    """The tracker sees only the front. A write straight onto the attached source (dd onto the
    raw device, buffered or O_DIRECT, or onto a loop source's file) shows in the kernel's trace
    of the source's writes: the next incremental compares digests, says why, and restores
    exactly."""
    vol, source, mnt = bench.ext4_volume("past", VOLUME)
    seed(mnt, random.Random(11))
    out = bench.tmp / "out"
    out.mkdir()
    backup("past", out / "full.zst", incremental=False)
    with open(os.path.join(mnt, "docs", "f002.txt"), "r+b") as f:      # through the front: tracked
        f.write(b"through the front")
        os.fsync(f.fileno())
    tracked = backup("past", out / "i0.zst", incremental=True)
    assert tracked.method == "tracker", tracked.reason
    for n, flags in enumerate((os.O_RDWR, os.O_RDWR | os.O_DIRECT)):
        buf = mmap.mmap(-1, 4096)
        buf.write(bytes([0xC0 + n]) * 4096)
        fd = os.open(source, flags)
        try:
            os.pwrite(fd, buf, VOLUME - (2 + n) * MiB)
            os.fsync(fd)
        finally:
            os.close(fd)
        digests_restore_exactly("past", out, str(n), VOLUME - (2 + n) * MiB, bytes([0xC0 + n]) * 4096)
    # The file behind the loop device, written without passing the loop device.
    with open(loop.backing_file(source), "r+b") as f:
        f.seek(VOLUME - 5 * MiB)
        f.write(b"\x77" * 4096)
    digests_restore_exactly("past", out, "file", VOLUME - 5 * MiB, b"\x77" * 4096, why="the file behind")
    # Nothing past the front since, and a live upgrade of the worker meanwhile: trusted again.
    with open(os.path.join(mnt, "docs", "f003.txt"), "r+b") as f:
        f.write(b"after")
        os.fsync(f.fileno())
    assert imager("volumes", "restart", "past").returncode == 0
    again = backup("past", out / "i3.zst", incremental=True)
    assert again.method == "tracker", again.reason


def test_a_backup_whose_snapshot_is_written_past_the_front_fails_and_the_next_compares_digests(bench):
    """A write onto the source while a backup reads its snapshot changes what the snapshot holds:
    the backup fails, saying why, even when that write is still in the page cache, and nothing
    of it is catalogued. The next incremental compares digests and restores exactly."""
    vol, source, mnt = bench.ext4_volume("spoil", VOLUME)
    seed(mnt, random.Random(12))
    out = bench.tmp / "out"
    out.mkdir()
    backup("spoil", out / "full.zst", incremental=False)

    def write_past_the_front():
        with open(source, "r+b") as f:          # buffered, never flushed by the writer
            f.seek(VOLUME - 3 * MiB)
            f.write(b"\xee" * 8192)

    with pytest.raises(Exception, match="no longer point-in-time.*written outside the front"):
        backup("spoil", out / "i1.zst", incremental=True, progress=ViewCopy("spoil", out / "v1.raw",
                                                                             then=write_past_the_front))
    with Catalog() as catalog:
        assert [i.kind for i in catalog.images()] == ["full"]
    digests_restore_exactly("spoil", out, "after", VOLUME - 3 * MiB, b"\xee" * 8192)


def test_a_killed_workers_writes_still_in_the_page_cache_are_not_taken_for_writes_past_the_front(bench):
    """The page cache outlives a worker killed with SIGKILL: what it wrote reaches the disk after
    the next worker has started a new series. Those writes are its own, not someone else's: a
    snapshot held across the kill stays valid."""
    source = bench.loop_device(VOLUME, name="killed.img")
    vol = bench.attach(source, "killed")
    assert imager("snapshot", "create", "killed").returncode == 0
    bench.defer(lambda: imager("snapshot", "delete", "killed"))
    buf = mmap.mmap(-1, 1 * MiB)
    buf.write(os.urandom(1 * MiB))
    fd = os.open(vol.front, os.O_RDWR | os.O_DIRECT)    # to the daemon, which writes to the page cache
    try:
        for n in range(8):
            os.pwrite(fd, buf, n * 4 * MiB)
    finally:
        os.close(fd)
    pid = daemon.status("killed").worker["pid"]
    kill_and_wait(pid)
    wait_until(lambda: daemon.status("killed").worker["pid"] != pid, "the next worker")
    assert daemon.check_source("killed") == ""
    snapshot = daemon.status("killed").snapshot
    assert snapshot is not None and not snapshot.invalid, snapshot.invalid_reason


def test_while_the_watch_of_writes_past_the_front_is_off_no_tracked_change_is_trusted(bench):
    """Someone switches the trace of the source's writes off: what it did not record cannot be
    known, so the incrementals that cover any of that time compare digests, saying why; once
    the trace is back on, the first whose whole interval it recorded is tracked again."""
    vol, source, mnt = bench.ext4_volume("blind", VOLUME)
    seed(mnt, random.Random(13))
    out = bench.tmp / "out"
    out.mkdir()
    backup("blind", out / "full.zst", incremental=False)
    switch = "/sys/kernel/tracing/instances/imager-writes-blind/tracing_on"
    # Off for the first; back on during the second, which covers time it was off; on for the third.
    for n, state in enumerate(("0", "1", "1")):
        with open(switch, "w") as f:
            f.write(state)
        with open(os.path.join(mnt, "docs", f"f00{n}.txt"), "r+b") as f:
            f.write(b"through the front")
            os.fsync(f.fileno())
        result = backup("blind", out / f"i{n}.zst", incremental=True)
        if n < 2:
            assert result.method == "digest" and "switched off" in result.reason, result.reason
        else:
            assert result.method == "tracker", result.reason


def _write_direct(path: str, offset: int, byte: int, length: int = 4096) -> None:
    buf = mmap.mmap(-1, length)
    buf.write(bytes([byte]) * length)
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        os.pwrite(fd, buf, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_a_partition_written_past_the_front_through_its_disk_is_seen_and_its_neighbour_is_none_of_its_business(bench):
    """A managed partition: a write to its range through the whole disk's node is past the front
    as much as one through its own; a write to the partition beside it changes nothing of it."""
    disk, part, neighbour = partitioned_disk(bench, VOLUME, 16 * MiB)
    vol = bench.attach(part, "part")
    subprocess.run(["mkfs.ext4", "-q", "-F", vol.front], check=True)
    mnt = bench.mount(vol.front, "mnt-part")
    with open(os.path.join(mnt, "data.bin"), "wb") as f:
        f.write(random.Random(3).randbytes(8 * MiB))
    os.sync()
    out = bench.tmp / "out"
    out.mkdir()
    backup("part", out / "full.zst", incremental=False)
    _write_direct(neighbour, 0, 0x5A)
    result = backup("part", out / "i1.zst", incremental=True)
    assert result.method == "tracker", result.reason
    _write_direct(disk, 1 * MiB + VOLUME - 2 * MiB, 0xA5)      # the partition starts at 1 MiB
    digests_restore_exactly("part", out, "disk", VOLUME - 2 * MiB, b"\xa5" * 4096)


def test_a_clean_detach_keeps_the_tracker_and_a_write_behind_it_does_not(bench):
    vol, source, mnt = bench.ext4_volume("keep", VOLUME)
    seed(mnt, random.Random(5))
    out = bench.tmp / "out"
    out.mkdir()
    backup("keep", out / "full.zst", incremental=False)
    with open(os.path.join(mnt, "docs", "f001.txt"), "r+b") as f:
        f.write(b"changed before the detach")
    umount_point(mnt)
    assert imager("detach", "keep").returncode == 0
    attached = imager("attach", source, "--name", "keep", "--cache", str(bench.tmp / "state-keep"))
    assert attached.returncode == 0, attached.stderr
    bench.adopt("keep")
    view = out / "view1.raw"
    first = backup("keep", out / "i1.zst", incremental=True, progress=ViewCopy("keep", view))
    assert first.method == "tracker", first.reason
    restore(out / "i1.zst", out / "r1.raw")
    assert same(out / "r1.raw", view)

    # written while detached, behind imager's back: the tracker must not be trusted
    assert imager("detach", "keep").returncode == 0
    with open(source, "r+b") as dev:
        dev.seek(VOLUME - 3 * MiB)
        dev.write(b"\xa5" * 8192)
        os.fsync(dev.fileno())
    assert imager("attach", source, "--name", "keep", "--cache", str(bench.tmp / "state-keep")).returncode == 0
    bench.adopt("keep")
    view2 = out / "view2.raw"
    second = backup("keep", out / "i2.zst", incremental=True, progress=ViewCopy("keep", view2))
    assert second.method == "digest" and "written while it was detached" in second.reason, second.reason
    restore(out / "i2.zst", out / "r2.raw")
    assert same(out / "r2.raw", view2)
    with open(out / "r2.raw", "rb") as f:
        f.seek(VOLUME - 3 * MiB)
        assert f.read(8192) == b"\xa5" * 8192

    # A user who wants the certain way asks for it; the tracker goes on after it.
    front = daemon.status("keep").front
    for offset, byte in ((VOLUME - 5 * MiB, b"\x5a"), (VOLUME - 7 * MiB, b"\x3c")):
        with open(front, "r+b") as dev:
            dev.seek(offset)
            dev.write(byte * 4096)
            os.fsync(dev.fileno())
        if byte == b"\x5a":
            done = imager("backup", "--snapshot", "cow", "keep", "-o", str(out / "i3.zst"), "--incremental",
                          "--compare-digests", "--all-blocks", "--json")
            assert done.returncode == 0, done.stderr
            (summary,) = json.loads(done.stdout)["images"]
            assert summary["method"] == "digest" and "--compare-digests" in summary["reason"], summary
    fourth = backup("keep", out / "i4.zst", incremental=True)
    assert fourth.method == "tracker", fourth.reason
    restore(out / "i4.zst", out / "r4.raw")
    with open(out / "r4.raw", "rb") as f:
        f.seek(VOLUME - 7 * MiB)
        assert f.read(4096) == b"\x3c" * 4096
        f.seek(VOLUME - 5 * MiB)
        assert f.read(4096) == b"\x5a" * 4096
    assert fourth.changed_blocks == 1


def _start_backup(name: str, output, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "imager.cli", "backup", "--snapshot", "cow", "--incremental",
                             "--all-blocks", "--workers", "1", "--level", "19", name, "-o", str(output), *args],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_writing(proc: subprocess.Popen, directory) -> None:
    deadline = time.monotonic() + WAIT
    while not writing_into(proc.pid, directory):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the backup never started writing its image"
        time.sleep(0.02)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL", "cache full"])
def test_a_failed_incremental_loses_no_change(bench, how):
    # Room for what ext4 writes back on its own during the next backup (2.1 MiB seen once),
    # not for the overflow below.
    cache = {"cache_size": 8 * MiB} if how == "cache full" else {}
    vol, source, mnt = bench.ext4_volume("fail", VOLUME, **cache)
    rng = random.Random(11)
    with open(os.path.join(mnt, "data.bin"), "wb") as f:
        f.write(rng.randbytes(40 * MiB))
    out = bench.tmp / "out"
    out.mkdir()
    backup("fail", out / "full.zst", incremental=False)
    with open(os.path.join(mnt, "data.bin"), "r+b") as f:     # the changes the failed backup carried
        for _ in range(50):
            f.seek(rng.randrange(40 * MiB))
            f.write(rng.randbytes(4096))
        os.fsync(f.fileno())
    failed_dir = out / "failed"
    failed_dir.mkdir()
    if how == "cache full":
        def overflow():
            with open(os.path.join(mnt, "data.bin"), "r+b") as f:
                f.write(rng.randbytes(24 * MiB))
                os.fsync(f.fileno())
        with pytest.raises(CacheFullError):
            backup("fail", failed_dir / "x.zst", incremental=True, progress=ViewCopy("fail", out / "unused.raw",
                                                                                      overflow))
    else:
        proc = _start_backup("fail", failed_dir / "x.zst")
        bench.defer(lambda: proc.kill() if proc.poll() is None else None)
        _wait_writing(proc, failed_dir)
        proc.send_signal(getattr(signal, how))
        proc.communicate(timeout=WAIT)
        assert proc.returncode != 0
        deadline = time.monotonic() + WAIT
        while daemon.status("fail").snapshot is not None:    # the daemon drops a dead backup's snapshot
            assert time.monotonic() < deadline
            time.sleep(0.02)
    assert not os.listdir(failed_dir)
    view = out / "view.raw"
    result = backup("fail", out / "next.zst", incremental=True, progress=ViewCopy("fail", view))
    assert result.method == "tracker" and result.parent_id, result.reason
    restore(out / "next.zst", out / "restored.raw")
    assert same(out / "restored.raw", view), "the next incremental lost what the failed one held"


def test_retention_keeps_every_chain_restorable(bench):
    vol, source, mnt = bench.ext4_volume("keep", VOLUME)
    rng = random.Random(13)
    seed(mnt, rng)
    out = bench.tmp / "out"
    out.mkdir()
    views = []
    for i in range(4):
        if i:
            with open(os.path.join(mnt, "data.bin"), "r+b") as f:
                f.seek(rng.randrange(12 * MiB))
                f.write(rng.randbytes(64 << 10))
        views.append(out / f"view{i}.raw")
        backup("keep", out / f"b{i}.zst", incremental=i > 0, progress=ViewCopy("keep", views[-1]))
    listed = imager("catalog", "list")
    assert listed.stdout.count("incremental on") == 3, listed.stdout

    dry = imager("catalog", "prune", "--keep-last", "1", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["removed"] == [], "the newest incremental needs every image before it"
    pruned = imager("catalog", "prune", "--keep-last", "1", "--consolidate", "--json")
    assert pruned.returncode == 0, pruned.stderr
    report = json.loads(pruned.stdout)
    assert len(report["consolidated"]) == 1 and len(report["removed"]) == 4
    assert sorted(os.listdir(out)) == sorted(["b3.full.zst"] + [v.name for v in views])
    restore(out / "b3.full.zst", out / "r.raw")
    assert same(out / "r.raw", views[3])
    assert imager("catalog", "check").returncode == 0

    # an incremental on the synthetic full, then its parent deleted by hand: said, not hidden
    backup("keep", out / "b4.zst", incremental=True)
    os.unlink(out / "b3.full.zst")
    checked = imager("catalog", "check")
    assert checked.returncode == 1 and "b3.full.zst is missing" in checked.stdout, checked.stdout
    one_line_error(imager("restore", str(out / "b4.zst"), str(out / "r4.raw")), "parent image", "is missing",
                   "the catalog has it at .*b3.full.zst, which is missing")
    assert not os.path.exists(out / "r4.raw")


def test_prune_keeps_a_parent_taken_from_another_source_and_dry_run_says_what_consolidate_does(bench):
    """An incremental may name any image as its parent (--parent): the rules choose per volume
    or source, but what a kept image needs is kept whichever volume it came from. The dry run
    of --consolidate lists what the real run removes."""
    vol, source, mnt = bench.ext4_volume("cross", VOLUME)
    rng = random.Random(17)
    seed(mnt, rng)
    out = bench.tmp / "out"
    out.mkdir()
    view = out / "view.raw"

    def night() -> None:
        with open(os.path.join(mnt, "data.bin"), "r+b") as f:
            f.seek(rng.randrange(12 * MiB))
            f.write(rng.randbytes(64 << 10))
    backup("cross", out / "b0.zst", incremental=False)
    night()
    backup("cross", out / "b1.zst", incremental=True, progress=ViewCopy("cross", view))
    # the point of b1, taken again from a copy of its snapshot (another source) on b1
    other = imager("backup", str(view), "-o", str(out / "other.zst"), "-i", "--parent", str(out / "b1.zst"),
                   "--all-blocks", "--chunk-size", "1M")
    assert other.returncode == 0, other.stderr
    night()
    backup("cross", out / "b2.zst", incremental=False)        # the volume's chain starts again
    night()
    backup("cross", out / "b3.zst", incremental=True)

    dry = imager("catalog", "prune", "--keep-last", "1", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    planned = json.loads(dry.stdout)
    pruned = imager("catalog", "prune", "--keep-last", "1", "--json")
    assert pruned.returncode == 0, pruned.stderr
    report = json.loads(pruned.stdout)
    assert report["removed"] == planned["removed"] == [] and report["files_deleted"] == []
    assert len(report["kept"]) == 5, report        # other.zst keeps b1 and b0; b3 keeps b2
    restore(out / "other.zst", out / "r.raw")
    assert same(out / "r.raw", view)

    # --consolidate: a synthetic full of each chain's oldest kept incremental takes its place
    planned = json.loads(imager("catalog", "prune", "--keep-last", "1", "--consolidate", "--dry-run",
                                "--json").stdout)
    assert planned["dry_run"] and len(planned["replaced"]) == 2 and not planned["consolidated"]
    before = sorted(os.listdir(out))
    pruned = imager("catalog", "prune", "--keep-last", "1", "--consolidate", "--json")
    assert pruned.returncode == 0, pruned.stderr
    report = json.loads(pruned.stdout)
    assert sorted(report["removed"]) == sorted(planned["removed"]) and len(report["removed"]) == 5
    assert sorted(report["files_deleted"]) == sorted(planned["files_deleted"])
    assert sorted(report["replaced"]) == sorted(planned["replaced"]) and len(report["consolidated"]) == 2
    assert sorted(os.listdir(out)) == sorted(set(before) - {os.path.basename(p) for p in report["files_deleted"]}
                                             | {"other.full.zst", "b3.full.zst"})
    restore(out / "other.full.zst", out / "r2.raw")
    assert same(out / "r2.raw", view)


def test_force_does_not_write_over_an_image_others_were_taken_on(bench):
    """-f over a full (or an incremental) that later incrementals build on would leave them
    unrestorable: refused, naming them, whether the catalog knows them or only the directory."""
    vol, source, mnt = bench.ext4_volume("force", VOLUME)
    seed(mnt, random.Random(19))
    out = bench.tmp / "out"
    out.mkdir()
    backup("force", out / "b0.zst", incremental=False)
    backup("force", out / "b1.zst", incremental=True)
    kept = (out / "b0.zst").read_bytes()
    for catalog in ([], ["--catalog", str(bench.tmp / "empty.sqlite")]):
        refused = imager("backup", "--snapshot", "cow", "force", "-o", str(out / "b0.zst"), "-f", *catalog)
        one_line_error(refused, "b0.zst: image [0-9a-f]{12} is the parent of [0-9a-f]{12} \\(.*b1.zst\\)",
                       "unrestorable", code=2)
        assert (out / "b0.zst").read_bytes() == kept
        # nor by a synthetic full of the chain built on it
        refused = imager("consolidate", str(out / "b1.zst"), "-o", str(out / "b0.zst"), "--force", *catalog)
        one_line_error(refused, "b0.zst: image [0-9a-f]{12} is the parent of [0-9a-f]{12} \\(.*b1.zst\\)",
                       "unrestorable", code=2)
        assert (out / "b0.zst").read_bytes() == kept
    # the newest image of a chain has no children: -f replaces it
    replaced = imager("backup", "--snapshot", "cow", "force", "-o", str(out / "b1.zst"), "-f")
    assert replaced.returncode == 0, replaced.stderr


def test_damage_in_a_parent_is_named_by_its_file(bench):
    """A chain point is read from several files: an error names the one that holds the damage,
    and verify --json says ok: false."""
    vol, source, mnt = bench.ext4_volume("named", VOLUME)
    seed(mnt, random.Random(23))
    out = bench.tmp / "out"
    out.mkdir()
    backup("named", out / "b0.zst", incremental=False)
    with open(os.path.join(mnt, "data.bin"), "r+b") as f:
        f.write(os.urandom(64 << 10))
    backup("named", out / "b1.zst", incremental=True)
    with ImageReader(str(out / "b0.zst")) as reader:
        chunk = max(range(reader.header.chunk_count), key=lambda c: reader.chunk_frame_sizes[c])
    damage_chunk(out / "b0.zst", chunk)
    named = f"b0.zst: chunk {chunk} "
    one_line_error(imager("verify", str(out / "b1.zst")), named)
    verified = imager("verify", str(out / "b1.zst"), "--json")
    assert verified.returncode == 1
    report = json.loads(verified.stdout)
    assert report["ok"] is False and named in report["images"][0]["errors"][0]
    one_line_error(imager("restore", str(out / "b1.zst"), str(out / "r.raw")), named)
    assert not os.path.exists(out / "r.raw")
