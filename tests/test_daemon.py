"""The managed-volume front with real parts: loop devices, a FUSE daemon, ext4, fsck, mount."""

import errno
import os
import subprocess
import sys

import pytest

from devices import loop
from imager.snapshot import daemon
from imager.errors import ImagerError, SnapshotError, VolumeError, VolumeRefused

from conftest import fsck_clean
from lab import DAEMON_TESTS, MiB, REPO_ROOT, VOLUME_SIZE, ext4_file, kill_and_wait, stop_volume, write_file

pytestmark = DAEMON_TESTS


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

    snap_set = daemon.snapshot_create(["v1"])
    assert snap_set.frozen_mounts == [mnt]
    assert 0 < snap_set.freeze_window_ms < 10_000
    (snap,) = snap_set.snapshots
    assert daemon.snapshot_list() == [daemon.status("v1").snapshot]

    # keep writing: overwrite in place, rewrite the big file, add a file
    notes_after = b"AFTER" + notes_before[5:]
    data_after = os.urandom(8 * MiB)
    write_file(os.path.join(mnt, "notes.txt"), b"AFTER", in_place=True)
    write_file(os.path.join(mnt, "data.bin"), data_after, in_place=True)
    write_file(os.path.join(mnt, "new.txt"), b"only after")
    os.sync()
    assert daemon.status("v1").snapshot.changed_blocks > 0

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

    with pytest.raises(VolumeRefused, match="has a snapshot"):
        daemon.detach("v1")
    daemon.snapshot_delete(["v1"])
    assert not os.path.exists(snap.path)
    assert daemon.snapshot_list() == []
    with pytest.raises(VolumeError, match="is mounted at"):
        daemon.detach("v1")

    lab.undo_last()   # unmount the front
    daemon.detach("v1")
    assert daemon.list_volumes() == []
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
    snap_set = daemon.snapshot_create(
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
    daemon.snapshot_delete(["set0", "set1"])


def test_failing_hook_leaves_no_snapshot_and_thaws(lab):
    vol = lab.attach(lab.loop_device(), "hooked")
    subprocess.run(["mkfs.ext4", "-q", "-F", vol.front], check=True)
    mnt = lab.mount(vol.front, "mnt")
    with pytest.raises(SnapshotError, match="post-thaw hook"):
        daemon.snapshot_create("hooked", post_thaw_hooks=["exit 3"])
    assert daemon.status("hooked").snapshot is None
    undone = []
    with pytest.raises(SnapshotError, match="pre-freeze hook .*false.* exit status 1"):
        daemon.snapshot_create("hooked", pre_freeze_hooks=[["false"]],
                              post_thaw_hooks=[lambda: undone.append(True)])
    assert undone == [True]                      # what the pre-freeze hooks began is undone
    assert daemon.status("hooked").snapshot is None
    write_file(os.path.join(mnt, "still-writable"), b"thawed")   # would hang if left frozen


def test_cache_full_keeps_the_volume_writable_and_fails_the_snapshot(lab):
    vol = lab.attach(lab.loop_device(), "small", cache_size=MiB)
    daemon.snapshot_create("small")
    payload = os.urandom(8 * MiB)
    with open(vol.front, "r+b", buffering=0) as f:
        f.write(payload)
        os.fsync(f.fileno())
    with open(vol.front, "rb", buffering=0) as f:
        assert f.read(len(payload)) == payload
    snap = daemon.status("small").snapshot
    assert snap.invalid
    assert snap.cache_bytes_needed >= 8 * MiB
    assert "full" in snap.invalid_reason
    with pytest.raises(OSError) as failed:
        with open(snap.path, "rb") as f:
            f.read(4096)
    assert failed.value.errno == errno.EIO
    daemon.snapshot_delete("small")


def test_attach_refuses_what_it_cannot_manage(lab, tmp_path):
    with pytest.raises(VolumeError, match="no such device"):
        daemon.attach(str(tmp_path / "missing"))
    with pytest.raises(VolumeError, match="is a directory"):
        daemon.attach(str(tmp_path))

    mounted_source = lab.loop_device(name="mounted.img")
    subprocess.run(["mkfs.ext4", "-q", "-F", mounted_source], check=True)
    lab.mount(mounted_source, "direct")
    with pytest.raises(VolumeError, match="is mounted at"):
        daemon.attach(mounted_source)

    source = lab.loop_device()
    vol = lab.attach(source, "once")
    with pytest.raises(VolumeError, match="already managed as 'once'"):
        daemon.attach(source, name="twice", cache_path=str(tmp_path / "other-state"))
    with pytest.raises(VolumeError, match="already attached"):
        daemon.attach(lab.loop_device(name="another.img"), name="once")
    with pytest.raises(VolumeError, match="front device of managed volume"):
        daemon.attach(vol.front, name="stacked", cache_path=str(tmp_path / "stacked-state"))

    with pytest.raises(VolumeError, match="no managed volume named 'nope'"):
        daemon.snapshot_create(["nope"])
    with pytest.raises(VolumeRefused, match="has no snapshot"):
        daemon.snapshot_delete("once")
    with pytest.raises(VolumeError, match="no managed volume"):
        daemon.detach("nope")


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
    daemon.snapshot_create("held")
    path = daemon.status("held").snapshot.path
    with open(path, "rb") as held:
        with pytest.raises(VolumeRefused, match="still open"):
            daemon.snapshot_delete("held")
        daemon.snapshot_delete("held", force=True)
        with pytest.raises(OSError):
            held.read(4096)
    assert daemon.status("held").snapshot is None
    del vol


def test_daemon_outlives_its_starter_and_keeps_a_snapshot_across_restart(lab, tmp_path):
    source = lab.loop_device()
    state = str(tmp_path / "state-bg")
    starter = subprocess.run(
        [sys.executable, "-c",
         "import sys; from imager.snapshot import daemon; "
         f"print(daemon.attach({source!r}, name='bg', cache_path={state!r}).pid)"],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": REPO_ROOT})
    pid = int(starter.stdout.strip())
    vol = daemon.status("bg")
    lab._undo.append(lambda: stop_volume(vol))
    assert vol.pid == pid
    assert os.getsid(pid) != os.getsid(0)                    # its own session, no terminal
    assert os.readlink(f"/proc/{pid}/fd/2") == vol.log_path  # stdio goes to the state dir's log

    before = os.urandom(4 * MiB)
    with open(vol.front, "r+b", buffering=0) as f:
        f.write(before)
        os.fsync(f.fileno())
    daemon.snapshot_create("bg")
    with open(vol.front, "r+b", buffering=0) as f:
        f.write(os.urandom(4 * MiB))
        os.fsync(f.fileno())

    # the daemon dies: it is reported as failed, attach points to recover, and the recovered
    # daemon on the same state directory serves the same snapshot
    kill_and_wait(pid)
    (listed,) = daemon.list_volumes()
    assert listed.state == "failed" and "imager recover bg" in listed.problem
    with pytest.raises(VolumeError, match="imager recover bg"):
        daemon.attach(source, name="bg", cache_path=state)
    restarted = daemon.recover("bg")
    lab._undo.append(lambda: stop_volume(restarted))
    assert restarted.snapshot is not None
    with open(restarted.snapshot.path, "rb") as f:
        assert f.read(len(before)) == before
    daemon.snapshot_delete("bg")
    daemon.detach("bg")
