"""The front survives its daemon (#15): kill -9 of a managed volume's worker, again and again,
under writers that fsync, is a pause to the filesystem on the front, never an error."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from imager import jobs
from imager.errors import VolumeError
from imager.snapshot import daemon
from imager.snapshot.daemon.protocol import request

from conftest import fsck_clean, sweep_size
from lab import (wait_until, DAEMON_TESTS, REPO_ROOT, SMALL_CHUNKS, WAIT, MiB, Writers, WritesWhileReading,
                 assert_no_snapshot_leftovers, assert_same_instant, capture, check_live_volume, imager, kill_and_wait,
                 kill_process)

pytestmark = DAEMON_TESTS

# The acceptance count (50 on each filesystem) under make test-long; fewer in make test.
KILLS = sweep_size(50, 12)
BACKUP_KILLS = sweep_size(25, 3)     # during one backup from the snapshot


@pytest.mark.sweep
@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_the_filesystem_on_the_front_survives_kill_9_of_the_worker(bench, fs):
    vol, source, mnt = bench.ext4_volume("survivor", fs=fs)
    log_since = kernel_log_end()
    writers = Writers(bench, mnt)                  # a document, SQLite (WAL) and file churn, fsync'ing
    progress = writers.wait_progress()
    for kill in range(1, KILLS + 1):
        worker = daemon.status("survivor").worker
        kill_and_wait(worker["pid"])
        # Served again: every writer gets on, none has seen an error (it would have exited).
        progress = writers.wait_progress(beyond=progress)
        assert daemon.status("survivor").worker["restarts"] == kill
    reports = writers.stop()
    assert mount_options(mnt)[0] == "rw"
    assert front_errors(vol.front, log_since) == []
    check_live_volume(bench, vol, source, mnt, reports, "survivor", fs)   # fsck clean, every write there


def test_a_snapshot_reads_the_same_across_worker_deaths(bench):
    vol, source, mnt = bench.ext4_volume("kept")
    writers = Writers(bench, mnt)
    progress = writers.wait_progress()
    (snap,) = daemon.snapshot_create(["kept"]).snapshots
    before = digest(snap.path)
    with open(snap.path, "rb") as held:            # a reader's handle, opened by the first worker
        for kill in range(3):
            # Writers overwrite blocks whose originals must go to the cache first, also in the
            # worker that is killed half-way through one of those copies.
            progress = writers.wait_progress(beyond=progress)
            kill_and_wait(daemon.status("kept").worker["pid"])
            assert len(held.read(MiB)) == MiB     # the old handle is served by the new worker
        progress = writers.wait_progress(beyond=progress)
    assert digest(snap.path) == before
    snap_dev = bench.loop_on(snap.path)
    checked = fsck_clean(snap_dev)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    bench.undo_last()
    daemon.snapshot_delete(["kept"])
    reports = writers.stop()
    check_live_volume(bench, vol, source, mnt, reports, "kept")


def test_detach_after_worker_deaths_leaves_nothing_behind(bench):
    vol, source, mnt = bench.ext4_volume("tidy", 64 * MiB)
    with open(os.path.join(mnt, "kept.txt"), "wb") as f:
        f.write(b"acknowledged")
        os.fsync(f.fileno())
    kill_and_wait(daemon.status("tidy").worker["pid"])
    with pytest.raises(VolumeError, match="is mounted at"):
        daemon.detach("tidy")                      # a restarted worker still refuses what the first did
    subprocess.run(["umount", mnt], check=True)
    wait_released(vol.front)
    daemon.detach("tidy")
    assert daemon.list_volumes() == []
    assert not os.path.exists(vol.run_dir)
    assert not any(line.split()[1].startswith(vol.run_dir) for line in open("/proc/mounts"))
    checked = fsck_clean(source)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def wait_released(device: str) -> None:
    """Until nothing holds `device` any more. On a shared machine a mount namespace made by
    another program while our filesystem was mounted keeps a copy of the mount, and with it the
    device, for a moment after our umount returns."""
    deadline = time.monotonic() + WAIT
    while True:
        try:
            os.close(os.open(device, os.O_RDONLY | os.O_EXCL))
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def mount_options(point: str) -> list[str]:
    with open("/proc/mounts") as f:
        return next(line.split()[3] for line in f if line.split()[1] == point).split(",")


def kernel_log() -> list[tuple[float, str]]:
    lines = subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout.splitlines()
    return [(float(line[1:line.index("]")]), line) for line in lines if line.startswith("[")]


def kernel_log_end() -> float:
    log = kernel_log()
    return log[-1][0] if log else 0.0


def front_errors(front: str, since: float) -> list[str]:
    """What the kernel said went wrong with the front (loop I/O errors, ext4 errors or a
    read-only remount) since `since`. Not the refusals of WRITE_ZEROES and DISCARD: the front
    does not offer them (no FALLOCATE), and ext4 writes zeros instead."""
    name = os.path.basename(front)
    unsupported = ("operation not supported error", "(WRITE_ZEROES)", "(DISCARD)")
    return [line for t, line in kernel_log() if t > since and (f"{name})" in line or f"{name}:" in line or
                                                               f"{name}," in line)
            and any(word in line.lower() for word in ("error", "read-only", "remount"))
            and not (unsupported[0] in line and any(op in line for op in unsupported[1:]))]


@pytest.mark.sweep
def test_kill_9_of_the_worker_during_a_backup_keeps_the_image_one_point_in_time(bench):
    vol, source, mnt = bench.ext4_volume("midway")
    writers = Writers(bench, mnt, journal="WAL")
    writers.wait_progress(at_least=3)
    window = {}

    def record():
        window.update(capture(mnt, bench.tmp / "window"))
        window["progress"] = writers.progress()

    wait_writers = WritesWhileReading([writers], lambda: [window], ["midway"])
    killed = []

    def kill_while_reading(n: int) -> None:
        if len(killed) < BACKUP_KILLS:    # at each of the first chunks the backup writes
            killed.append(daemon.status("midway").worker["pid"])
            kill_and_wait(killed[-1])
        wait_writers(n)                   # the writers go on past the snapshot, served by new workers

    out = bench.tmp / "out"
    out.mkdir()
    (result,) = jobs.backup_volumes(["midway"], jobs.Destination(output=str(out / "midway.zst")), snapshot="cow",
                                    while_frozen=record, options=SMALL_CHUNKS, progress=kill_while_reading)
    assert len(killed) == BACKUP_KILLS and daemon.status("midway").worker["restarts"] == BACKUP_KILLS
    assert_no_snapshot_leftovers([vol], out, {"midway.zst"})
    reports = writers.stop()
    restored = bench.restore(result.image, "restored")
    point = bench.mount(restored, "restored-mnt", "ro")
    assert_same_instant(capture(point, bench.tmp / "restored-copy"), window, "midway")
    check_live_volume(bench, vol, source, mnt, reports, "midway")


HOLDER = """
import sys
from imager.snapshot import daemon
from imager.snapshot.daemon.protocol import request
held = daemon.HeldSnapshots([sys.argv[1]])
print(held.info.snapshots[0].generation, flush=True)
sys.stdin.read()
"""


def test_a_snapshot_whose_backup_dies_after_its_worker_died_is_deleted(bench):
    vol, source, mnt = bench.ext4_volume("orphan", 64 * MiB)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, "orphan"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    bench.defer(lambda: kill_process(holder))
    generation = int(holder.stdout.readline())
    kill_and_wait(daemon.status("orphan").worker["pid"])
    # The new worker serves the same snapshot: the holder's connection went with the old one.
    assert daemon.status("orphan").snapshot.generation == generation
    kill_and_wait(holder.pid)
    wait_until(lambda: daemon.status("orphan").snapshot is None, "the orphaned snapshot was not deleted")


@pytest.mark.parametrize("stuck", ["stopped", "hung-write"])
def test_the_watchdog_replaces_a_worker_that_stops_answering(bench, monkeypatch, stuck):
    monkeypatch.setenv("IMAGER_FAILPOINTS", "on")      # every worker may be armed, none is yet
    vol, source, mnt = bench.ext4_volume("watched", 64 * MiB, watchdog=1.0)
    writers = Writers(bench, mnt, kinds=("doc", "sqlite"))
    writers.wait_progress()
    worker = daemon.status("watched").worker["pid"]
    if stuck == "stopped":
        os.kill(worker, signal.SIGSTOP)               # answers nothing, FUSE or control
    else:
        # The FUSE server blocks on one write for good (a stuck device); the control socket answers.
        request("watched", {"op": "failpoints", "set": "source.write=HANG"})

    def replaced() -> bool:
        try:
            return daemon.status("watched").worker["pid"] != worker
        except VolumeError:         # the stopped worker keeps the control socket until it is replaced
            return False

    # Waited for as such: progress alone could be writes that were done before the worker stuck.
    wait_until(replaced, "the watchdog to replace the stuck worker")
    # Replaced: the writers go on without an error, their stuck request resent to the new worker.
    writers.wait_progress(beyond=writers.progress())
    now = daemon.status("watched").worker
    assert now["restarts"] >= 1     # more, if a loaded machine ever kept one a second
    with open(vol.log_path) as f:
        said = f.read()
    reason = "did not answer in 1 s" if stuck == "stopped" else "has been serving one FUSE request for"
    assert f"worker {worker} {reason}" in said and "killing it (watchdog" in said, said
    assert not re.search(rf"worker {now['pid']} .*killing it", said)     # the one serving now was not
    reports = writers.stop()
    check_live_volume(bench, vol, source, mnt, reports, "watched")


def test_a_live_upgrade_under_writers_is_a_pause(bench):
    vol, source, mnt = bench.ext4_volume("upgraded")
    log_since = kernel_log_end()
    writers = Writers(bench, mnt)
    progress = writers.wait_progress()
    for n in range(1, 4):
        old = daemon.status("upgraded").worker["pid"]
        restarted = imager("volumes", "restart", "upgraded")
        assert restarted.returncode == 0, restarted.stderr
        assert f"restart {n}" in restarted.stdout
        assert daemon.status("upgraded").worker["pid"] != old
        progress = writers.wait_progress(beyond=progress)
    reports = writers.stop()
    assert mount_options(mnt)[0] == "rw"
    assert front_errors(vol.front, log_since) == []
    check_live_volume(bench, vol, source, mnt, reports, "upgraded")
