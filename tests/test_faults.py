"""Faults that must never take a volume down: a killed backup never leaves a filesystem frozen
or a snapshot behind, the volume daemon survives every error on its write path, a dead daemon
is reported and recovered, a stuck daemon holds up no one else, a killed plan leaves no mount.

Real loop devices, ext4 mounted on real fronts, real writer processes; faults inside the daemon
come from its failpoints (imager.failpoints), everything else is the real thing: SIGKILL,
SIGTERM, SIGSTOP, a full tmpfs."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from devices import loop
from devices.freeze import FIFREEZE, FITHAW
from imager import jobs
from imager.snapshot import daemon
from imager.errors import ImagerError, SnapshotError
from imager.snapshot.daemon.protocol import request
from imager.snapshot.freeze_guard import frozen_record
from imager.spawn import process_start_time

from conftest import device_size, sweep_size
from conftest import fsck_clean
from lab import (wait_until, MiB, REPO_ROOT, WAIT, Writers, fill_with_data, imager, kill_and_wait, kill_process,
                 one_line_error, snapshot_names, umount_point)


def frozen(point: str) -> bool:
    """Whether the filesystem at `point` is frozen: a second FIFREEZE says EBUSY. When it was not,
    the probe's own freeze is undone at once."""
    fd = os.open(point, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.ioctl(fd, FIFREEZE, 0)
        except OSError as e:
            if e.errno == errno.EBUSY:
                return True
            raise
        fcntl.ioctl(fd, FITHAW, 0)
        return False
    finally:
        os.close(fd)


def start(*argv: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "imager.cli", *argv], cwd=REPO_ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


# -- 1. the freeze is held by a guard that thaws when the job dies ----------------------------

@pytest.mark.sweep
def test_a_killed_backup_never_leaves_a_filesystem_frozen(bench):
    device, mnt = bench.plain_ext4("frz", 64 * MiB)
    bench.thaw_at_teardown(mnt)
    fill_with_data(mnt, 32 * MiB)
    out = bench.tmp / "out"
    out.mkdir()
    rng = random.Random(9)
    kills = sweep_size(60, 6)
    for n in range(kills):
        sig = signal.SIGKILL if n % 2 == 0 else signal.SIGTERM
        image = out / f"frz{n}.zst"
        flag = bench.tmp / f"freezing{n}"
        # The freeze provider reads the whole volume frozen (seconds at level 19): a kill soon
        # after the pre-freeze hook lands inside the window, one at a random time anywhere.
        proc = start("backup", "--snapshot", "freeze", device, "-o", str(image), "--level", "19",
                     "--workers", "1", "--all-blocks", "--pre-freeze", f"touch {flag}")
        if rng.random() < 0.7:
            wait_until(lambda: proc.poll() is not None or flag.exists(), "the backup never reached its freeze")
            time.sleep(rng.uniform(0, 0.3))
        else:
            time.sleep(rng.uniform(0, 1.0))
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=WAIT)
        if sig == signal.SIGTERM and proc.returncode != 0:
            # 130: interrupted and cleaned up; -15: killed while Python was still starting
            assert proc.returncode in (130, -signal.SIGTERM) and "Traceback" not in stderr, stderr
        wait_until(lambda: not frozen(mnt), f"{mnt} stayed frozen after {sig.name} of the backup")
        assert not image.exists() or jobs.verify(str(image)).ok
        for leftover in out.iterdir():
            assert not leftover.name.startswith("."), f"a temporary image was left: {leftover}"
    with open(os.path.join(mnt, "still-writable"), "wb") as f:
        f.write(b"yes")
        os.fsync(f.fileno())


def test_sigkill_inside_a_snapshot_window_thaws_and_drops_the_snapshot(bench):
    vol, source, mnt = bench.ext4_volume("win")
    bench.thaw_at_teardown(mnt)
    flag = bench.tmp / "in-window"
    script = textwrap.dedent(f"""
        import time
        from imager.snapshot import daemon
        def hold():
            open({str(flag)!r}, "w").close()
            time.sleep(600)
        daemon.HeldSnapshots(["win"], while_frozen=hold, max_freeze=600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT)
    bench.defer(lambda: kill_process(proc))
    wait_until(lambda: flag.exists() or proc.poll() is not None, "the window never opened")
    assert frozen(mnt) and daemon.status("win").snapshot is not None
    proc.kill()
    proc.wait()
    wait_until(lambda: not frozen(mnt), "the filesystem stayed frozen after SIGKILL in the window")
    wait_until(lambda: daemon.status("win").snapshot is None,
               "the daemon kept the snapshot of a backup that died")


def test_a_freeze_left_by_a_backup_killed_with_its_guard_is_thawed_by_the_next_one(bench):
    """kill -9 of a backup and of its freeze guard too (a service's stop kills the whole unit):
    nothing was there to thaw, so the next freeze of imager does, and says so."""
    device, mnt = bench.plain_ext4("orphan", 64 * MiB)
    bench.thaw_at_teardown(mnt)
    flag = bench.tmp / "in-window"
    script = textwrap.dedent(f"""
        import time
        from imager.snapshot.freeze import freeze_window
        with freeze_window([{mnt!r}], max_seconds=600):
            open({str(flag)!r}, "w").close()
            time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT)
    bench.defer(lambda: kill_process(proc))
    wait_until(lambda: flag.exists() or proc.poll() is not None, "the window never opened")
    [guard] = _freeze_guards_of(proc.pid)
    os.kill(proc.pid, signal.SIGSTOP)       # both at once, as a unit's stop: the job cannot react
    wait_until(lambda: all(_state(proc.pid, task) == "T" for task in os.listdir(f"/proc/{proc.pid}/task")),
               "the job did not stop")
    os.kill(guard, signal.SIGKILL)
    wait_until(lambda: process_start_time(guard) is None, "the guard did not die")    # a zombie of the stopped job
    proc.kill()
    proc.wait()
    assert frozen(mnt), "nothing should have thawed it: the guard was killed first"
    done = imager("backup", "--snapshot", "freeze", device, "-o", str(bench.tmp / "next.zst"))
    assert done.returncode == 0, done.stderr
    assert f"thawed {mnt}" in done.stderr and f"(pid {guard}) was killed" in done.stderr, done.stderr
    assert not frozen(mnt)


def test_a_freeze_guard_killed_alone_is_noticed_and_its_freeze_thawed_at_once(bench):
    """kill -9 of the guard while the job holds its freeze: the job thaws the filesystem at once
    (its writers do not wait for the job's end), fails at its next check saying so, and leaves
    no record of a freeze behind."""
    device, mnt = bench.plain_ext4("alone", 64 * MiB)
    bench.thaw_at_teardown(mnt)
    flag = bench.tmp / "in-window"
    script = textwrap.dedent(f"""
        import sys, time
        from imager.errors import SnapshotError
        from imager.snapshot.freeze import freeze_window
        try:
            with freeze_window([{mnt!r}], max_seconds=600) as window:
                open({str(flag)!r}, "w").close()
                while True:
                    time.sleep(0.05)
                    window.check()
        except SnapshotError as e:
            sys.exit(str(e))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)
    bench.defer(lambda: kill_process(proc))
    wait_until(lambda: flag.exists() or proc.poll() is not None, "the window never opened")
    [guard] = _freeze_guards_of(proc.pid)
    assert frozen(mnt)
    os.kill(guard, signal.SIGKILL)
    wait_until(lambda: not frozen(mnt), "the filesystem stayed frozen after its guard was killed")
    with open(os.path.join(mnt, "written-after.txt"), "w") as f:     # writers go on
        f.write("ok")
    assert proc.wait(WAIT) == 1
    message = proc.stderr.read().strip()
    assert f"the freeze guard (pid {guard}) was killed while it held the freeze" in message, message
    assert f"thawed {mnt}" in message and "not of one instant" in message
    assert not os.path.exists(frozen_record(guard))


def _state(pid: int, task: str) -> str:
    with open(f"/proc/{pid}/task/{task}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _cgroup2_mount() -> str | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[:1] == ["cgroup2"]:
                return left.split()[4]
    return None


@pytest.mark.skipif(_cgroup2_mount() is None, reason="needs a cgroup2 hierarchy")
def test_the_freeze_guard_leaves_the_cgroup_of_its_job(tmp_path):
    """A service's stop kills every process of its cgroup: the guard, which must outlive the job
    to thaw, moves to the root cgroup (and creates no file where no cgroup filesystem is)."""
    job_group = os.path.join(_cgroup2_mount(), f"imager-test-{os.getpid()}")
    os.mkdir(job_group)
    try:
        guard = subprocess.Popen(["sh", "-c", f"echo $$ > {job_group}/cgroup.procs && exec {sys.executable} -S -m "
                                              f"imager.snapshot.freeze_guard"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO_ROOT)
        try:
            assert json.loads(guard.stdout.readline()) == {"ready": True}
            with open(f"/proc/{guard.pid}/cgroup") as f:
                unified = [line.split(":", 2)[2].strip() for line in f if line.startswith("0::")]
            assert unified == ["/"], unified
        finally:
            guard.stdin.close()
            guard.wait(timeout=WAIT)
    finally:
        os.rmdir(job_group)


def _freeze_guards_of_this_process() -> list[int]:
    return _freeze_guards_of(os.getpid())


def _freeze_guards_of(parent_pid: int) -> list[int]:
    guards = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read()
        except (OSError, IndexError):
            continue
        if parent == parent_pid and b"imager.snapshot.freeze_guard" in command:
            guards.append(int(pid))
    return guards


def test_a_snapshot_set_refused_before_its_freeze_leaves_no_freeze_guard(bench):
    """The guard is started before the daemons are asked, so that its interpreter starts
    meanwhile: a set refused then (a snapshot already there, a volume not attached) must end it,
    not leave it to the end of a long-lived process."""
    vol, source, mnt = bench.ext4_volume("early")
    in_window: list[list[int]] = []
    daemon.HeldSnapshots(["early"], while_frozen=lambda: in_window.append(_freeze_guards_of_this_process())).close()
    assert len(in_window) == 1 and len(in_window[0]) == 1       # what is looked for is there in a window
    daemon.snapshot_create("early")
    bench.defer(lambda: daemon.snapshot_delete("early"))
    for names, refusal in ((["early"], "already has a snapshot"), (["early", "nosuch"], "nosuch")):
        with pytest.raises(ImagerError, match=refusal):
            daemon.HeldSnapshots(names)
        assert _freeze_guards_of_this_process() == []
    assert not frozen(mnt)
    assert daemon.status("early").snapshot is not None     # a kept snapshot is the user's to delete


def test_a_freeze_longer_than_its_maximum_is_thawed_and_fails(bench):
    device, mnt = bench.plain_ext4("long", 64 * MiB)
    bench.thaw_at_teardown(mnt)
    fill_with_data(mnt, 32 * MiB)
    out = bench.tmp / "out"
    out.mkdir()
    backup = imager("backup", "--snapshot", "freeze", device, "-o", str(out / "long.zst"), "--level", "19",
                    "--workers", "1", "--all-blocks", "--max-freeze", "0.3")
    one_line_error(backup, "longer than the maximum of 0.3 s", "not of one instant")
    assert os.listdir(out) == []
    assert not frozen(mnt)
    vol, _, cow_mnt = bench.ext4_volume("cowlong")
    bench.thaw_at_teardown(cow_mnt)
    with pytest.raises(SnapshotError, match="longer than the maximum"):
        daemon.snapshot_create("cowlong", while_frozen=lambda: time.sleep(1.0), max_freeze=0.2)
    assert not frozen(cow_mnt) and daemon.status("cowlong").snapshot is None


# -- 2. the daemon survives every fault on its paths -------------------------------------------

VOLUME_FILE_FAULTS = {
    # failpoint -> what the test does, and what must happen
    "source.read=EIO@1048576+65536": "read-eio",
    "source.write=EIO@1048576+65536": "write-eio",
    "source.flush=EIO": "fsync-eio",
    "cow.cache-write=ENOSPC": "snapshot-invalid-write-ok",
    "cow.read-original=EIO@0+65536": "snapshot-invalid-write-ok",
    "cow.cache-sync=EIO": "snapshot-invalid-fsync-ok",
    "cow.cache-read=EIO": "snapshot-read-eio",
    "state.persist=ENOSPC": "snapshot-create-fails",
}


@pytest.mark.parametrize("failpoint", sorted(VOLUME_FILE_FAULTS))
def test_every_daemon_error_path_keeps_the_daemon_serving(bench, monkeypatch, failpoint):
    case = VOLUME_FILE_FAULTS[failpoint]
    monkeypatch.setenv("IMAGER_FAILPOINTS", "on")
    vol = bench.attach(bench.loop_device(16 * MiB), "faulty")
    monkeypatch.delenv("IMAGER_FAILPOINTS")
    request("faulty", {"op": "failpoints", "set": failpoint})
    block = os.urandom(64 << 10)
    fd = os.open(vol.fuse_file, os.O_RDWR)

    def disarm_and_close():
        request("faulty", {"op": "failpoints", "set": ""})
        os.close(fd)
    bench.defer(disarm_and_close)

    def errno_of(call) -> int:
        try:
            call()
        except OSError as e:
            return e.errno
        return 0

    if case == "read-eio":
        assert errno_of(lambda: os.pread(fd, 65536, 1 << 20)) == errno.EIO
        assert os.pread(fd, 65536, 0) == bytes(65536)
    elif case == "write-eio":
        assert errno_of(lambda: os.pwrite(fd, block, 1 << 20)) == errno.EIO
        assert os.pwrite(fd, block, 0) == len(block) and os.pread(fd, len(block), 0) == block
    elif case == "fsync-eio":
        os.pwrite(fd, block, 0)
        assert errno_of(lambda: os.fsync(fd)) == errno.EIO, "a failed device flush must reach the writer"
    elif case == "snapshot-create-fails":
        with pytest.raises(SnapshotError):
            daemon.snapshot_create("faulty")
        assert daemon.status("faulty").snapshot is None
        assert os.pwrite(fd, block, 0) == len(block)
    else:
        original = os.urandom(2 << 20)
        os.pwrite(fd, original, 0)
        os.fsync(fd)
        snap = daemon.snapshot_create("faulty").snapshots[0]
        assert os.pwrite(fd, block, 0) == len(block), "a fault in the copy-on-write path failed a writer"
        os.fsync(fd)
        assert os.pread(fd, len(block), 0) == block
        status = daemon.status("faulty").snapshot
        with open(snap.path, "rb", buffering=0) as view:
            if case == "snapshot-read-eio":
                assert not status.invalid
                assert errno_of(lambda: os.pread(view.fileno(), 65536, 0)) == errno.EIO
                assert os.pread(view.fileno(), 65536, 1 << 20) == original[1 << 20:(1 << 20) + 65536]
            else:
                assert status.invalid, status
                assert errno_of(lambda: os.pread(view.fileno(), 65536, 1 << 20)) == errno.EIO
        daemon.snapshot_delete("faulty", force=True)
    assert daemon.status("faulty").state == "running"
    assert os.pwrite(fd, block, 3 << 20) == len(block), "the daemon stopped serving writes"


def test_a_full_state_filesystem_invalidates_the_snapshot_and_fails_no_writer(bench):
    state = bench.tmpfs("state-full", "3m")
    source = bench.loop_device(name="full.img")
    attached = imager("attach", source, "--name", "full", "--cache", os.path.join(state, "full"))
    assert attached.returncode == 0, attached.stderr
    vol = bench.adopt("full")
    subprocess.run(["mkfs.ext4", "-q", "-F", vol.front], check=True)
    mnt = bench.mount(vol.front, "mnt-full")
    fill_with_data(mnt, 48 * MiB)
    snapshot_path = os.path.join(vol.run_dir, daemon.MOUNT_DIR_NAME, daemon.SNAPSHOT_FILE)
    bulk = Writers(bench, mnt, ("bulk",), extra=snapshot_path)
    writers = Writers(bench, mnt, ("doc", "sqlite"))
    out = bench.tmp / "out"
    out.mkdir()
    backup = imager("backup", "--snapshot", "cow", "full", "-o", str(out / "full.zst"), "--workers", "1",
                    "--level", "19")
    one_line_error(backup, r"(?i)full")
    bulk.stop()             # every writer exits 0: none ever saw an error
    writers.stop()
    assert daemon.status("full").state == "running"
    options = next(line.split()[5] for line in open("/proc/self/mountinfo") if f" {mnt} " in line)
    assert options.split(",")[0] == "rw", f"the front's filesystem went read-only: {options}"
    umount_point(mnt)
    daemon.detach("full")
    checked = fsck_clean(source)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_stored_backup_whose_snapshot_cannot_be_deleted_succeeds_and_says_so(bench, monkeypatch):
    monkeypatch.setenv("IMAGER_FAILPOINTS", "on")
    vol, _, mnt = bench.ext4_volume("undeletable")
    monkeypatch.delenv("IMAGER_FAILPOINTS")
    bench.defer(lambda: request("undeletable", {"op": "failpoints", "set": ""}))
    fill_with_data(mnt, 8 * MiB)
    out = bench.tmp / "out"
    out.mkdir()
    catalog = str(bench.tmp / "catalog.sqlite")
    # After the thaw the snapshot exists: from then on its state file cannot be written, as on
    # a full state filesystem, so its end cannot be recorded.
    arm = (f"{sys.executable} -c \"from imager.snapshot.daemon.protocol import request; "
           f"request('undeletable', {{'op': 'failpoints', 'set': 'state.persist=ENOSPC'}})\"")
    backup = imager("backup", "--snapshot", "cow", "undeletable", "-o", str(out / "full.zst"), "--catalog", catalog,
                    "--post-thaw", arm)
    assert backup.returncode == 0, backup.stderr
    warning = [line for line in backup.stderr.splitlines() if "could not be deleted" in line]
    assert len(warning) == 1 and "imager snapshot delete undeletable" in warning[0], backup.stderr
    assert "Traceback" not in backup.stderr
    assert imager("verify", str(out / "full.zst")).returncode == 0
    (entry,) = json.loads(imager("catalog", "list", "--json", "--catalog", catalog).stdout)["images"]
    assert [segment["path"] for segment in entry["segments"]] == [str(out / "full.zst")]
    left = daemon.status("undeletable").snapshot
    assert left is not None and left.invalid and left.delete_failed
    (listed,) = json.loads(imager("volumes", "--json").stdout)["volumes"]
    assert listed["snapshot"]["delete_failed"] is True
    log_text = open(daemon.status("undeletable").log_path).read()
    assert "could not delete" in log_text and "went away" not in log_text
    # The next backup deletes it first; while its end still cannot be recorded, it says so and
    # how it ends.
    line = one_line_error(imager("backup", "--snapshot", "cow", "undeletable", "-o", str(out / "next.zst")),
                          "fails again", "imager snapshot delete undeletable")
    assert "No space left" in line
    assert daemon.status("undeletable").snapshot.generation == left.generation
    # Once it can be recorded, the next night needs no one to delete it by hand.
    request("undeletable", {"op": "failpoints", "set": ""})
    after = imager("backup", "--snapshot", "cow", "undeletable", "-o", str(out / "next.zst"), "--catalog", catalog,
                   "--incremental", "--json", "-v")
    assert after.returncode == 0, after.stderr
    assert f"deleting snapshot generation {left.generation} first" in after.stderr
    (result,) = json.loads(after.stdout)["images"]
    assert result["kind"] == "incremental" and result["method"] == "tracker", result
    assert daemon.status("undeletable").snapshot is None
    assert imager("verify", str(out / "next.zst")).returncode == 0


# -- 3. a dead daemon is reported, and recovered ---------------------------------------------------

def test_a_killed_daemon_is_reported_and_recovered(bench):
    vol, source, mnt = bench.ext4_volume("dead")
    with open(os.path.join(mnt, "kept.txt"), "wb", buffering=0) as f:
        f.write(b"acknowledged")
        os.fsync(f.fileno())
    kill_and_wait(vol.pid)
    listed = imager("volumes")
    assert listed.returncode == 0 and "FAILED" in listed.stdout and "imager recover dead" in listed.stdout, listed.stdout
    (entry,) = json.loads(imager("volumes", "--json").stdout)["volumes"]
    assert entry["state"] == "failed" and f"umount {mnt}" in entry["problem"]
    line = one_line_error(imager("attach", source, "--name", "dead"), "imager recover dead", code=2)
    assert "died" in line
    one_line_error(imager("recover", "dead"), "still mounted", "unmount it first")
    one_line_error(imager("snapshot", "create", "dead"), "is gone", "imager recover dead")
    umount_point(mnt)
    recovered = imager("recover", "dead", "--json")
    assert recovered.returncode == 0, recovered.stderr
    info = json.loads(recovered.stdout)
    assert info["state"] == "running" and "ext4" in info["problem"]
    bench.adopt("dead")
    point = bench.mount(info["front"], "mnt-again")
    with open(os.path.join(point, "kept.txt"), "rb") as f:
        assert f.read() == b"acknowledged"
    umount_point(point)
    # A dead volume that is not mounted is simply cleaned up by detach.
    kill_and_wait(info["pid"])
    assert imager("detach", "dead").returncode == 0
    assert daemon.list_volumes() == [] and not any(i.backing_file == info["fuse_file"] for i in loop.list_attached())


# -- 4. a stuck daemon holds up only its own volume -------------------------------------------------

def test_a_stopped_daemon_holds_up_no_other_backup(bench):
    stuck, _, _ = bench.ext4_volume("stuck", 64 * MiB, watchdog=0)   # no watchdog: it stays stuck
    other, _, other_mnt = bench.ext4_volume("other", 64 * MiB)
    fill_with_data(other_mnt, 4 * MiB)
    plain, plain_mnt = bench.plain_ext4("plain", 64 * MiB)
    # The worker is what answers; its supervisor only waits for it.
    os.kill(stuck.worker["pid"], signal.SIGSTOP)
    bench.defer(lambda: os.kill(stuck.worker["pid"], signal.SIGCONT))
    out = bench.tmp / "out"
    out.mkdir()
    # Before, every backup asked every daemon for its status with a 60 s timeout.
    backup = imager("backup", "--snapshot", "cow", "other", "-o", str(out / "other.zst"), timeout=30)
    assert backup.returncode == 0, backup.stderr
    backup = imager("backup", plain, "-o", str(out / "plain.zst"), timeout=30)
    assert backup.returncode == 0, backup.stderr
    listed = imager("volumes", "--json", timeout=30)
    states = {v["name"]: v["state"] for v in json.loads(listed.stdout)["volumes"]}
    assert states == {"stuck": "not answering", "other": "running"}
    one_line_error(imager("backup", "--snapshot", "cow", "stuck", "-o", str(out / "stuck.zst"), timeout=30),
                   "stuck", "did not answer")
    assert sorted(os.listdir(out)) == ["other.zst", "plain.zst"]


# -- 5. killed jobs leave no planning mount, no snapshot ---------------------------------------------

def _loops_on(path: str) -> list[str]:
    real = os.path.realpath(path)
    st = os.stat(real)
    found = []
    for info in loop.list_attached():
        try:
            backing = os.stat(info.backing_file)
        except OSError:
            continue
        if info.backing_file == real or (stat.S_ISBLK(backing.st_mode) and backing.st_rdev == st.st_rdev):
            found.append(info.device)
    return found


@pytest.mark.sweep
def test_killed_backups_leave_no_planning_mount_and_no_snapshot(bench):
    unmounted = bench.loop_device(64 * MiB, name="unmounted.img")
    subprocess.run(["mkfs.ext4", "-q", "-F", unmounted], check=True)
    vol, _, mnt = bench.ext4_volume("kill", 64 * MiB)
    bench.thaw_at_teardown(mnt)
    fill_with_data(mnt, 16 * MiB)
    out = bench.tmp / "out"
    out.mkdir()
    rng = random.Random(5)
    for n in range(sweep_size(60, 6)):
        cow = n % 2 == 1
        argv = (["backup", "--snapshot", "cow", "kill"] if cow else ["backup", unmounted])
        proc = start(*argv, "-o", str(out / f"k{n}.zst"), "--level", "9")
        time.sleep(rng.uniform(0, 0.8))
        proc.send_signal(signal.SIGKILL if n % 4 < 2 else signal.SIGTERM)
        proc.communicate(timeout=WAIT)
        wait_until(lambda: not _loops_on(unmounted), f"a loop device on {unmounted} was left behind")
        assert not [line for line in open("/proc/self/mountinfo") if "imager-plan" in line or
                    os.path.realpath(unmounted) in line.split(" - ")[1]]
        wait_until(lambda: "kill" not in snapshot_names(), "the snapshot of a killed backup stayed")
        assert not frozen(mnt)
        image = out / f"k{n}.zst"
        assert not image.exists() or jobs.verify(str(image)).ok
    # Every later backup works, and restores.
    for argv in (["backup", "--snapshot", "cow", "kill"], ["backup", unmounted]):
        final = out / f"final-{len(argv)}.zst"
        r = imager(*argv, "-o", str(final))
        assert r.returncode == 0, r.stderr
        restored = bench.restore(str(final), f"restored-{len(argv)}")
        assert fsck_clean(restored).returncode == 0


@pytest.mark.sweep
def test_a_killed_restore_leaves_no_file_at_its_final_name(bench):
    device, mnt = bench.plain_ext4("rst", 64 * MiB)
    fill_with_data(mnt, 24 * MiB)
    umount_point(mnt)
    image = bench.tmp / "rst.zst"
    assert imager("backup", device, "-o", str(image)).returncode == 0
    rng = random.Random(3)
    for n in range(sweep_size(30, 4)):
        target = bench.tmp / f"restored{n}.raw"
        proc = start("restore", str(image), str(target), "--workers", "1")
        time.sleep(rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL if n % 2 == 0 else signal.SIGTERM)
        proc.communicate(timeout=WAIT)
        # A restore the signal came too late for is whole: the device's bytes, all of them.
        assert not target.exists() or os.path.getsize(target) == device_size(device) and \
            subprocess.run(["cmp", str(target), device]).returncode == 0
        assert not [p for p in bench.tmp.iterdir() if p.name.startswith(f".restored{n}")]


# -- 6. bad input that used to succeed ------------------------------------------------------------

def test_bad_inputs_are_refused_in_one_line(bench, tmp_path):
    empty = tmp_path / "empty.img"
    empty.touch()
    one_line_error(imager("attach", str(empty), "--name", "e"), "empty", code=2)
    source = bench.loop_device(16 * MiB, name="twice.img")
    one_line_error(imager("attach", source, "--name", ""), "bad volume name", code=2)
    assert imager("attach", source, "--name", "once").returncode == 0
    bench.adopt("once")
    other = bench.loop_device(16 * MiB, name="other.img")
    one_line_error(imager("attach", other, "--name", "once"), "already attached", code=2)
    one_line_error(imager("attach", source, "--name", "again"), "already managed", code=2)
    one_line_error(imager("detach", "nosuch"), "no managed volume named 'nosuch'", code=2)
    r = imager("backup", source, "-o", str(tmp_path / "w.zst"), "--workers", "100000")
    assert r.returncode == 2 and "at most 256 workers" in r.stderr
    one_line_error(imager("backup", other, "-o", str(tmp_path / "l.zst"), "--label", "MONDAY"),
                   "goes only with --tape", code=2)
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "imager.cli", "devices"], stdout=full, stderr=subprocess.PIPE,
                           text=True, cwd=REPO_ROOT)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "No space left" in r.stderr, r.stderr


# -- 7. nothing that holds volume data is readable by others, no path another user controls --------

def test_private_files_and_paths_other_users_control(bench, tmp_path):
    vol = bench.attach(bench.loop_device(16 * MiB, name="priv.img"), "priv")
    daemon.snapshot_create("priv")
    bench.defer(lambda: daemon.snapshot_delete("priv", force=True, missing_ok=True))
    for name in os.listdir(vol.state_dir):
        mode = stat.S_IMODE(os.stat(os.path.join(vol.state_dir, name)).st_mode)
        assert mode & 0o077 == 0, f"{name} is {oct(mode)}"
    assert stat.S_IMODE(os.stat(vol.state_dir).st_mode) & 0o077 == 0
    tape = tmp_path / "t.tap"
    assert imager("tape", "label", "PRIV", "--tape", str(tape)).returncode == 0
    assert stat.S_IMODE(tape.stat().st_mode) & 0o077 == 0

    # A directory another user controls, with symlinks planted in it.
    other = tmp_path / "other"
    other.mkdir()
    os.chmod(other, 0o1777)
    (other / "victim").write_text("root's file")
    os.symlink(other / "victim", other / "catalog.sqlite")
    os.lchown(other / "catalog.sqlite", 65534, 65534)
    os.symlink(tmp_path / "elsewhere", other / "state")
    os.lchown(other / "state", 65534, 65534)
    r = imager("catalog", "list", "--catalog", str(other / "catalog.sqlite"))
    assert r.returncode == 2 and "another user controls" in r.stderr, r.stderr
    assert (other / "victim").read_text() == "root's file"
    source = bench.loop_device(16 * MiB, name="sym.img")
    r = imager("attach", source, "--name", "sym", "--cache", str(other / "state"))
    assert r.returncode == 2 and "another user controls" in r.stderr, r.stderr
    assert not (tmp_path / "elsewhere").exists()
    owned = tmp_path / "owned"
    owned.mkdir()
    os.chown(owned, 65534, 65534)
    r = imager("attach", source, "--name", "sym", "--cache", str(owned / "state"))
    assert r.returncode == 2 and "owned by uid 65534" in r.stderr, r.stderr


def test_a_planning_mount_left_by_an_older_imager_is_removed_and_said(bench, tmp_path):
    stale = "/run/imager-plan-leftover-test"
    os.mkdir(stale)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "leftover", stale], check=True)
    bench.defer(lambda: (os.path.ismount(stale) and subprocess.run(["umount", "-l", stale]),
                         os.path.isdir(stale) and os.rmdir(stale)))
    device, _ = bench.plain_ext4("plan", 64 * MiB)
    r = imager("backup", device, "-o", str(tmp_path / "p.zst"))
    assert r.returncode == 0, r.stderr
    assert f"removed {stale}, a planning mount left by a killed imager" in r.stderr
    assert not os.path.exists(stale)
