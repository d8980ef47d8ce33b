"""The snapshot providers: one conformance suite every provider passes, and what each does
that the others do not (freeze blocks writers for the whole read; none warns that a read-write
mount gives a crash-consistent image at best)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from devices.fs import file_extents
from imager import jobs
from imager.errors import ImagerError, UsageError
from imager.snapshot import daemon
from imager.snapshot.provider import PROVIDERS, SnapshotRequest, provider
from conftest import fsck_clean
from lab import (DAEMON_TESTS, MiB, Writers, assert_after_snapshot_differs, assert_final_content,
                assert_same_instant, capture, fill_with_data, gpt_disk_with_esp, imager, one_line_error,
                umount_point)

pytestmark = DAEMON_TESTS

# -- what every provider does -------------------------------------------------------------------

def _volume_for(bench, name: str) -> tuple[str, str]:
    """A mounted ext4 volume as the provider `name` takes it: (what a backup names, mount point)."""
    if name == "cow":
        vol, _, point = bench.ext4_volume(f"conf{name}", 64 * MiB)
        return vol.name, point
    device, point = bench.plain_ext4(f"conf{name}", 64 * MiB)
    bench.thaw_at_teardown(point)
    return device, point


def _written_elsewhere(point: str, name: str) -> bool:
    """Whether another process can write and fsync a file on the filesystem: it blocks while the
    filesystem is frozen, so a frozen filesystem fails this within the timeout."""
    code = f"import os; f = open({os.path.join(point, name)!r}, 'wb'); f.write(b'x'); os.fsync(f.fileno())"
    try:
        subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    except subprocess.TimeoutExpired:
        return False
    return True


@pytest.mark.parametrize("name", sorted(PROVIDERS))
def test_every_provider_gives_a_planned_readable_volume_and_holds_nothing_after(bench, name):
    source, point = _volume_for(bench, name)
    data = os.urandom(3 * MiB)
    with open(os.path.join(point, "data.bin"), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    # where the file's bytes are on the volume (the front of a managed volume maps 1:1)
    extents = file_extents(os.path.join(point, "data.bin"))
    assert sum(end - start for start, end in extents) >= len(data)
    taker = provider(name)
    assert taker.name == name
    with taker.take([source], SnapshotRequest()) as snapshot_set:
        (volume,) = snapshot_set.volumes
        assert volume.snapshot_meta["provider"] == name and volume.snapshot_meta["time"]
        assert volume.source.size == 64 * MiB and volume.plan.size == volume.source.size
        assert 0 < volume.plan.used_bytes < volume.source.size, "a used-block plan of the filesystem"
        for start, end in extents:
            assert volume.plan.covers(start, end), "the plan leaves out the file's blocks"
        read = bytearray()
        for start, end in extents:
            buf = memoryview(bytearray(end - start))
            assert volume.source.read_into(buf, start) == end - start
            read += buf
        assert bytes(read[:len(data)]) == data
        assert volume.source.read_into(memoryview(bytearray(4096)), volume.source.size) == 0
        if volume.check_reads is not None:
            volume.check_reads()
    assert _written_elsewhere(point, "after"), "the filesystem is still frozen"
    if name == "cow":
        assert daemon.status(source).snapshot is None, "the snapshot outlived the backup"


@pytest.mark.parametrize("name", sorted(PROVIDERS))
def test_every_provider_lets_go_when_the_backup_fails(bench, name):
    source, point = _volume_for(bench, name)
    with pytest.raises(RuntimeError, match="the backup failed"):
        with provider(name).take([source], SnapshotRequest()):
            raise RuntimeError("the backup failed")
    assert _written_elsewhere(point, "after-failure"), "the filesystem is still frozen"
    if name == "cow":
        assert daemon.status(source).snapshot is None


@pytest.mark.parametrize("name", sorted(PROVIDERS))
def test_every_provider_refuses_what_is_not_a_volume(bench, name):
    with pytest.raises(ImagerError) as refused:
        with provider(name).take([str(bench.tmp / "missing")], SnapshotRequest()):
            pass
    assert "\n" not in str(refused.value) and "missing" in str(refused.value)


def test_an_unknown_provider_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown snapshot provider 'lvm'.*none"):
        provider("lvm")


# -- 6. the freeze provider -------------------------------------------------------------------

def test_freeze_backup_blocks_writers_and_thaws(bench):
    device, mnt = bench.plain_ext4("frz", 64 * MiB)
    writers = Writers(bench, mnt, ("doc", "sqlite"), journal="WAL")
    bench.thaw_at_teardown(mnt)
    writers.wait_progress(at_least=3)
    window = {}
    while_imaging = []

    def record():
        window.update(capture(mnt, bench.tmp / "window"))

    def during(n):
        # called for every chunk written, still frozen: the writers have not moved
        with open(os.path.join(mnt, "doc.bin"), "rb") as f:
            while_imaging.append(f.read() == window["doc"])

    out = bench.tmp / "out"
    out.mkdir()
    (result,) = jobs.backup_volumes([device], jobs.Destination(output=str(out / "frz.zst")), snapshot="freeze",
                                    while_frozen=record, progress=during)
    assert while_imaging and all(while_imaging), "a writer wrote while the filesystem was frozen"
    assert result.freeze_window_ms > 0
    after = writers.wait_progress(beyond=writers.progress())   # the writers continue
    assert after

    # an image on the filesystem being frozen is refused, and nothing stays frozen
    refused = imager("backup", "--snapshot", "freeze", device, "-o", os.path.join(mnt, "self.zst"))
    one_line_error(refused, "which this backup freezes", code=2)
    with pytest.raises(UsageError, match="which this backup freezes"):
        jobs.backup_volumes([device], jobs.Destination(output=os.path.join(mnt, "self.zst")), snapshot="freeze")
    subprocess.run([sys.executable, "-c", f"open({os.path.join(mnt, 'thawed')!r}, 'w').write('ok')"],
                   check=True, timeout=30)
    writers.wait_progress(beyond=writers.progress())
    assert not os.path.exists(os.path.join(mnt, "self.zst"))
    reports = writers.stop()
    assert_after_snapshot_differs(reports, window)

    restored = bench.restore(str(out / "frz.zst"), "restored")
    point = bench.mount(restored, "restored-mnt", "ro")
    assert_same_instant(capture(point, bench.tmp / "restored-copy"), window, "frz")
    umount_point(mnt)
    checked = fsck_clean(device)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    point = bench.mount(device, "live-frz", "ro")
    assert_final_content(point, reports, bench.tmp / "live-copy")


def test_freeze_of_a_whole_disk_freezes_its_mounted_partitions(bench):
    """A whole disk whose partition is mounted read-write: the freeze provider freezes that
    partition's filesystem (it said "not mounted" and read the disk while it was written), so
    what was written just before is in the image."""
    esp = gpt_disk_with_esp(bench)
    disk = "/dev/" + os.path.basename(os.path.dirname(os.path.realpath(f"/sys/class/block/{os.path.basename(esp)}")))
    data = esp[:-1] + "2"
    subprocess.run(["mkfs.ext4", "-q", "-F", data], check=True)
    mnt = bench.mount(data, "part2")
    bench.thaw_at_teardown(mnt)
    payload = os.urandom(MiB)
    with open(os.path.join(mnt, "live.bin"), "wb") as f:
        f.write(payload)                    # in the page cache only: the freeze puts it on the disk
    out = bench.tmp / "out"
    out.mkdir()
    done = imager("backup", "--snapshot", "freeze", disk, "-o", str(out / "disk.zst"), "--json")
    assert done.returncode == 0, done.stderr
    assert f"freezing what is mounted on it: {mnt}" in done.stderr, done.stderr
    [result] = json.loads(done.stdout)["images"]
    assert result["freeze_window_ms"] > 0
    with open(os.path.join(mnt, "after.txt"), "w") as f:        # thawed
        f.write("ok")
    restored = bench.tmp / "restored.img"
    assert imager("restore", str(out / "disk.zst"), str(restored)).returncode == 0
    part = bench.loop_on(restored, read_only=True, offset=34816 * 512, size_limit=65536 * 512)
    point = bench.mount(part, "restored-part2", "ro", "noload")
    with open(os.path.join(point, "live.bin"), "rb") as f:
        assert f.read() == payload


# -- 7. no snapshot on a read-write mount -------------------------------------------------------

def test_a_snapshot_that_froze_nothing_reports_no_freeze_window(bench):
    """An unmounted device taken with --snapshot freeze, a managed volume whose front is not
    mounted: nothing was frozen, and the summary says nothing of a window."""
    device = bench.loop_device(64 * MiB, name="cold.img")
    subprocess.run(["mkfs.ext4", "-q", "-F", device], check=True)
    vol = bench.attach(bench.loop_device(64 * MiB, name="coldvol.img"), "coldvol")
    subprocess.run(["mkfs.ext4", "-q", "-F", vol.front], check=True)
    out = bench.tmp / "out"
    out.mkdir()
    for snapshot, source in (("freeze", device), ("cow", vol.name)):
        done = imager("backup", "--snapshot", snapshot, source, "-o", str(out / f"{snapshot}.zst"))
        assert done.returncode == 0, done.stderr
        assert "frozen for" not in done.stdout + done.stderr, done.stdout
        done = imager("backup", "--snapshot", snapshot, source, "-o", str(out / f"{snapshot}-2.zst"), "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["images"][0]["freeze_window_ms"] is None


def test_snapshot_none_of_a_read_write_mount_warns(bench):
    device, mnt = bench.plain_ext4("none", 64 * MiB)
    fill_with_data(mnt, MiB)
    out = bench.tmp / "out"
    out.mkdir()
    backup = imager("backup", "--snapshot", "none", device, "-o", str(out / "rw.zst"))
    assert backup.returncode == 0, backup.stderr
    assert re.search(r"mounted read-write .*crash-consistent", backup.stderr), backup.stderr
    subprocess.run(["mount", "-o", "remount,ro", mnt], check=True)
    quiet = imager("backup", "--snapshot", "none", device, "-o", str(out / "ro.zst"))
    assert quiet.returncode == 0, quiet.stderr
    assert "read-write" not in quiet.stderr, quiet.stderr


def test_snapshot_none_of_a_managed_source_warns_about_its_mounted_front(bench):
    vol, source, mnt = bench.ext4_volume("managed", 64 * MiB)
    out = bench.tmp / "out"
    out.mkdir()
    backup = imager("backup", "--snapshot", "none", source, "-o", str(out / "src.zst"))
    assert backup.returncode == 0, backup.stderr
    assert f"{vol.front} is mounted read-write at {mnt}" in backup.stderr, backup.stderr
