"""The managed-volume front with real parts: loop devices, a FUSE daemon, ext4, fsck, mount."""

import errno
import importlib.util
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from devices import loop
from imager import front
from imager.errors import ImagerError, SnapshotError

MiB = 1 << 20
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOLUME_SIZE = 128 * MiB

pytestmark = [
    pytest.mark.skipif(
        not (os.access("/dev/loop-control", os.W_OK) and os.access("/dev/fuse", os.W_OK)
             and shutil.which("mkfs.ext4")),
        reason="needs root, /dev/loop-control, /dev/fuse and e2fsprogs"),
    pytest.mark.skipif(importlib.util.find_spec("mfusepy") is None,
                       reason="the volume daemon needs mfusepy (pip install mfusepy)"),
]


class Lab:
    """What a test sets up, undone in reverse order at teardown even when the test failed
    halfway: mounts, managed volumes (snapshot deleted, detached, or killed), loop devices."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self._undo = []

    def loop_device(self, size=VOLUME_SIZE, name="source.img") -> str:
        backing = self.tmp / name
        with open(backing, "wb") as f:
            f.truncate(size)
        device = loop.attach(str(backing))
        self._undo.append(lambda: _detach_loop(device))
        return device

    def loop_on(self, path, read_only=True) -> str:
        device = loop.attach(str(path), read_only=read_only)
        self._undo.append(lambda: _detach_loop(device))
        return device

    def attach(self, device, name, **options) -> front.VolumeInfo:
        options.setdefault("cache_path", str(self.tmp / f"state-{name}"))
        info = front.attach(device, name=name, **options)
        self._undo.append(lambda: _stop_volume(info))
        return info

    def mount(self, device, where, *options) -> str:
        point = self.tmp / where
        point.mkdir(exist_ok=True)
        command = ["mount"] + (["-o", ",".join(options)] if options else []) + [device, str(point)]
        subprocess.run(command, check=True)
        self._undo.append(lambda: _umount(point))
        return str(point)

    def undo_last(self):
        self._undo.pop()()

    def close(self):
        failures = []
        while self._undo:
            try:
                self._undo.pop()()
            except Exception as e:  # keep undoing the rest
                failures.append(repr(e))
        assert not failures, failures


def _umount(point):
    if os.path.ismount(point):
        if subprocess.run(["umount", str(point)]).returncode != 0:
            subprocess.run(["umount", "-l", str(point)], check=True)


def _detach_loop(device):
    if any(info.device == device for info in loop.list_attached()):
        loop.detach(device)


def _stop_volume(info: front.VolumeInfo):
    if info.name not in [v.name for v in front.list_volumes()]:
        return
    try:
        front.snapshot_delete(info.name, force=True, missing_ok=True)
        front.detach(info.name)
        return
    except ImagerError:
        pass
    # Last resort for the daemon this test started: kill it by pid, then clear what it held.
    _kill_and_wait(info.pid)
    if info.front:
        _detach_loop(info.front)
    subprocess.run(["umount", "-l", os.path.join(info.run_dir, front.MOUNT_DIR_NAME)],
                   stderr=subprocess.DEVNULL)
    front.detach(info.name)  # what the dead daemon left in its run directory


def _kill_and_wait(pid, sig=signal.SIGKILL, timeout=10):
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        os.kill(pid, sig)
        ready, _, _ = select.select([pidfd], [], [], timeout)
        assert ready, f"process {pid} did not exit"
    finally:
        os.close(pidfd)


@pytest.fixture
def lab(tmp_path, monkeypatch):
    # A short run directory: a Unix socket path must fit in 107 bytes.
    run_dir = tempfile.mkdtemp(prefix="imgr-", dir="/tmp")
    monkeypatch.setenv(front.RUN_DIR_ENV, run_dir)
    lab = Lab(tmp_path)
    try:
        yield lab
    finally:
        lab.close()
        leftovers = [root for root, _, _ in os.walk(run_dir) if os.path.ismount(root)]
        assert not leftovers, f"still mounted after teardown: {leftovers}"
        shutil.rmtree(run_dir)


def ext4_file(image, path) -> bytes:
    """A file's contents read from an ext4 image by debugfs, which never writes to it."""
    result = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, check=True)
    return result.stdout


def fsck_clean(target) -> subprocess.CompletedProcess:
    return subprocess.run(["fsck.ext4", "-n", "-f", str(target)], capture_output=True, text=True)


def write_file(path, data, *, in_place=False):
    with open(path, "r+b" if in_place else "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def test_snapshot_of_a_mounted_volume_in_use(lab):
    source = lab.loop_device()
    vol = lab.attach(source, "v1", cache_size=64 * MiB)
    assert vol.front.startswith("/dev/loop") and os.path.exists(vol.fuse_file)
    subprocess.run(["mkfs.ext4", "-q", "-F", vol.front], check=True)
    mnt = lab.mount(vol.front, "mnt")
    notes_before = b"before the snapshot\n" * 500
    data_before = os.urandom(8 * MiB)
    write_file(os.path.join(mnt, "notes.txt"), notes_before)
    write_file(os.path.join(mnt, "data.bin"), data_before)

    snap_set = front.snapshot_create(["v1"])
    assert snap_set.frozen_mounts == [mnt]
    assert 0 < snap_set.freeze_window_ms < 10_000
    (snap,) = snap_set.snapshots
    assert front.snapshot_list() == [front.status("v1").snapshot]

    # keep writing: overwrite in place, rewrite the big file, add a file
    notes_after = b"AFTER" + notes_before[5:]
    data_after = os.urandom(8 * MiB)
    write_file(os.path.join(mnt, "notes.txt"), b"AFTER", in_place=True)
    write_file(os.path.join(mnt, "data.bin"), data_after, in_place=True)
    write_file(os.path.join(mnt, "new.txt"), b"only after")
    os.sync()
    assert front.status("v1").snapshot.changed_blocks > 0

    # the snapshot file is a plain file: open() and dd read it
    assert os.path.getsize(snap.path) == VOLUME_SIZE
    with open(snap.path, "rb") as f:
        assert len(f.read(MiB)) == MiB
    subprocess.run(["dd", f"if={snap.path}", "of=/dev/null", "bs=1M", "status=none"], check=True)
    with pytest.raises(OSError) as refused:
        open(snap.path, "r+b")
    assert refused.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)

    # a read-only loop device on it holds a clean ext4 with the pre-snapshot content
    snap_dev = lab.loop_on(snap.path, read_only=True)
    checked = fsck_clean(snap_dev)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    snap_mnt = lab.mount(snap_dev, "snapmnt", "ro")
    with open(os.path.join(snap_mnt, "notes.txt"), "rb") as f:
        assert f.read() == notes_before
    with open(os.path.join(snap_mnt, "data.bin"), "rb") as f:
        assert f.read() == data_before
    assert not os.path.exists(os.path.join(snap_mnt, "new.txt"))
    lab.undo_last()   # unmount the snapshot
    lab.undo_last()   # detach its loop device

    with pytest.raises(SnapshotError, match="snapshot"):
        front.detach("v1")
    front.snapshot_delete(["v1"])
    assert not os.path.exists(snap.path)
    assert front.snapshot_list() == []
    with pytest.raises(front.VolumeError, match="is mounted at"):
        front.detach("v1")

    lab.undo_last()   # unmount the front
    front.detach("v1")
    assert front.list_volumes() == []
    assert not os.path.exists(vol.front) or all(i.device != vol.front for i in loop.list_attached())

    checked = fsck_clean(source)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert ext4_file(source, "/notes.txt") == notes_after
    assert ext4_file(source, "/data.bin") == data_after
    assert ext4_file(source, "/new.txt") == b"only after"


def test_snapshot_set_freezes_every_volume_once_and_runs_hooks(lab, tmp_path):
    volumes = [lab.attach(lab.loop_device(name=f"src{i}.img"), f"set{i}") for i in range(2)]
    mounts = []
    for i, vol in enumerate(volumes):
        subprocess.run(["mkfs.ext4", "-q", "-F", vol.front], check=True)
        mounts.append(lab.mount(vol.front, f"mnt{i}"))
        write_file(os.path.join(mounts[-1], "marker"), f"volume {i} before".encode())
    events = []
    shell_hook_ran = tmp_path / "shell-hook-ran"
    snap_set = front.snapshot_create(
        ["set0", "set1"],
        pre_freeze_hooks=[lambda: events.append("pre"), f"touch {shell_hook_ran}"],
        post_thaw_hooks=[lambda: events.append("post")])
    assert events == ["pre", "post"]
    assert shell_hook_ran.exists()
    assert snap_set.frozen_mounts == mounts
    assert [s.name for s in snap_set.snapshots] == ["set0", "set1"]
    for i, mount_point in enumerate(mounts):
        write_file(os.path.join(mount_point, "marker"), b"changed after", in_place=True)
    os.sync()
    for i, snap in enumerate(snap_set.snapshots):
        assert ext4_file(snap.path, "/marker") == f"volume {i} before".encode()
    front.snapshot_delete(["set0", "set1"])


def test_failing_hook_leaves_no_snapshot_and_thaws(lab):
    vol = lab.attach(lab.loop_device(), "hooked")
    subprocess.run(["mkfs.ext4", "-q", "-F", vol.front], check=True)
    mnt = lab.mount(vol.front, "mnt")
    with pytest.raises(SnapshotError, match="post-thaw hook"):
        front.snapshot_create("hooked", post_thaw_hooks=["exit 3"])
    assert front.status("hooked").snapshot is None
    undone = []
    with pytest.raises(SnapshotError, match="pre-freeze hook .*false.* exit status 1"):
        front.snapshot_create("hooked", pre_freeze_hooks=[["false"]],
                              post_thaw_hooks=[lambda: undone.append(True)])
    assert undone == [True]                      # what the pre-freeze hooks began is undone
    assert front.status("hooked").snapshot is None
    write_file(os.path.join(mnt, "still-writable"), b"thawed")   # would hang if left frozen


def test_cache_full_keeps_the_volume_writable_and_fails_the_snapshot(lab):
    vol = lab.attach(lab.loop_device(), "small", cache_size=MiB)
    front.snapshot_create("small")
    payload = os.urandom(8 * MiB)
    with open(vol.front, "r+b", buffering=0) as f:
        f.write(payload)
        os.fsync(f.fileno())
    with open(vol.front, "rb", buffering=0) as f:
        assert f.read(len(payload)) == payload
    snap = front.status("small").snapshot
    assert snap.invalid
    assert snap.cache_bytes_needed >= 8 * MiB
    assert "full" in snap.invalid_reason
    with pytest.raises(OSError) as failed:
        with open(snap.path, "rb") as f:
            f.read(4096)
    assert failed.value.errno == errno.EIO
    front.snapshot_delete("small")


def test_attach_refuses_what_it_cannot_manage(lab, tmp_path):
    with pytest.raises(front.VolumeError, match="no such device"):
        front.attach(str(tmp_path / "missing"))
    with pytest.raises(front.VolumeError, match="is a directory"):
        front.attach(str(tmp_path))

    mounted_source = lab.loop_device(name="mounted.img")
    subprocess.run(["mkfs.ext4", "-q", "-F", mounted_source], check=True)
    lab.mount(mounted_source, "direct")
    with pytest.raises(front.VolumeError, match="is mounted at"):
        front.attach(mounted_source)

    source = lab.loop_device()
    vol = lab.attach(source, "once")
    with pytest.raises(front.VolumeError, match="already managed as 'once'"):
        front.attach(source, name="twice", cache_path=str(tmp_path / "other-state"))
    with pytest.raises(front.VolumeError, match="already attached"):
        front.attach(lab.loop_device(name="another.img"), name="once")
    with pytest.raises(front.VolumeError, match="front device of managed volume"):
        front.attach(vol.front, name="stacked", cache_path=str(tmp_path / "stacked-state"))

    with pytest.raises(front.VolumeError, match="no managed volume named 'nope'"):
        front.snapshot_create(["nope"])
    with pytest.raises(SnapshotError, match="has no snapshot"):
        front.snapshot_delete("once")
    with pytest.raises(front.VolumeError, match="no managed volume"):
        front.detach("nope")


def test_state_dir_on_the_source_is_refused(lab, tmp_path):
    # The source is a loop device on source.img; the state directory is in a filesystem that
    # lives in source.img too, through a second loop device: the cache would write the source.
    source = lab.loop_device()
    subprocess.run(["mkfs.ext4", "-q", "-F", source], check=True)
    same_file = lab.loop_on(tmp_path / "source.img", read_only=False)
    inside = lab.mount(same_file, "inside")
    with pytest.raises(ImagerError, match="being snapshotted"):
        lab.attach(source, "selfish", cache_path=os.path.join(inside, "state"))


def test_open_snapshot_file_blocks_delete_unless_forced(lab):
    vol = lab.attach(lab.loop_device(), "held")
    front.snapshot_create("held")
    path = front.status("held").snapshot.path
    with open(path, "rb") as held:
        with pytest.raises(SnapshotError, match="still open"):
            front.snapshot_delete("held")
        front.snapshot_delete("held", force=True)
        with pytest.raises(OSError):
            held.read(4096)
    assert front.status("held").snapshot is None
    del vol


def test_daemon_outlives_its_starter_and_keeps_a_snapshot_across_restart(lab, tmp_path):
    source = lab.loop_device()
    state = str(tmp_path / "state-bg")
    starter = subprocess.run(
        [sys.executable, "-c",
         "import sys; from imager import front; "
         f"print(front.attach({source!r}, name='bg', cache_path={state!r}).pid)"],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": REPO_ROOT})
    pid = int(starter.stdout.strip())
    vol = front.status("bg")
    lab._undo.append(lambda: _stop_volume(vol))
    assert vol.pid == pid
    assert os.getsid(pid) != os.getsid(0)                    # its own session, no terminal
    assert os.readlink(f"/proc/{pid}/fd/2") == vol.log_path  # stdio goes to the state dir's log

    before = os.urandom(4 * MiB)
    with open(vol.front, "r+b", buffering=0) as f:
        f.write(before)
        os.fsync(f.fileno())
    front.snapshot_create("bg")
    with open(vol.front, "r+b", buffering=0) as f:
        f.write(os.urandom(4 * MiB))
        os.fsync(f.fileno())

    # the daemon dies: it is reported as failed, attach points to recover, and the recovered
    # daemon on the same state directory serves the same snapshot
    _kill_and_wait(pid)
    (listed,) = front.list_volumes()
    assert listed.state == "failed" and "imager recover bg" in listed.problem
    with pytest.raises(front.VolumeError, match="imager recover bg"):
        front.attach(source, name="bg", cache_path=state)
    restarted = front.recover("bg")
    lab._undo.append(lambda: _stop_volume(restarted))
    assert restarted.snapshot is not None
    with open(restarted.snapshot.path, "rb") as f:
        assert f.read(len(before)) == before
    front.snapshot_delete("bg")
    front.detach("bg")
