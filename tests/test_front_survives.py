"""The front survives its daemon (#15): kill -9 of a managed volume's worker, again and again,
under writers that fsync, is a pause to the filesystem on the front, never an error."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import time

import pytest

from imager.errors import VolumeError
from imager.snapshot import daemon

from conftest import fsck_clean
from lab import DAEMON_TESTS, WAIT, MiB, Writers, check_live_volume, kill_and_wait

pytestmark = DAEMON_TESTS

KILLS = 20


def test_the_filesystem_on_the_front_survives_kill_9_of_the_worker(bench):
    vol, source, mnt = bench.ext4_volume("survivor")
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
    check_live_volume(bench, vol, source, mnt, reports, "survivor")   # fsck clean, every write there


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
