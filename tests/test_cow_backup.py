"""Acceptance: point-in-time backup of volumes in use, end to end.

Real writer processes (an editor rewriting a document in place, SQLite under transactions, files
created and deleted) write to ext4 on the front of attached volumes while `imager backup
--snapshot cow` runs. What the filesystems hold at the snapshot instant is read inside the freeze
window (`while_frozen`): reads work on a frozen filesystem, the writers are blocked and the freeze
has flushed their dirty data. Each image is restored onto a fresh loop device, checked by fsck and
compared with that record; the live volume must afterwards hold every write the writers made.

Everything a test sets up (loop devices, mounts, daemons, writer processes, frozen filesystems) is
undone at teardown in reverse order, also when the test fails half-way.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

from devices.fs import drop_cached
from imager import jobs
from imager.errors import ImagerError, UsageError
from imager.snapshot import daemon
from conftest import writing_into
from conftest import fsck_clean
from lab import (CHURN_KEEP, DAEMON_TESTS, MiB, REPO_ROOT, SMALL_CHUNKS, WAIT, Writers, WritesWhileReading,
                assert_after_snapshot_differs, assert_doc_point_in_time, assert_no_snapshot_leftovers,
                assert_same_instant, cached_bytes, capture, check_live_volume, churn_content, db_summary,
                fill_with_data,
                gpt_disk_with_esp, imager, kill_process, one_line_error, snapshot_names,
                umount_point)

pytestmark = DAEMON_TESTS

# -- 1. point in time under concurrent writers ---------------------------------------------------

def test_cow_backup_is_point_in_time_under_concurrent_writers(bench):
    vol, source, mnt = bench.ext4_volume("pit")
    writers = Writers(bench, mnt, journal="WAL")
    before = writers.wait_progress(at_least=3)
    window = {}

    def record():
        window.update(capture(mnt, bench.tmp / "window"))
        window["progress"] = writers.progress()

    out = bench.tmp / "out"
    out.mkdir()
    (result,) = jobs.backup_volumes(["pit"], jobs.Destination(output=str(out / "pit.zst")), snapshot="cow",
                                    while_frozen=record, options=SMALL_CHUNKS,
                                    progress=WritesWhileReading([writers], lambda: [window], ["pit"]))
    assert result.image == str(out / "pit.zst") and result.freeze_window_ms > 0
    assert all(window["progress"][k] >= before[k] for k in before)
    assert_no_snapshot_leftovers([vol], out, {"pit.zst"})
    reports = writers.stop()
    assert_after_snapshot_differs(reports, window)

    restored = bench.restore(str(out / "pit.zst"), "restored")
    point = bench.mount(restored, "restored-mnt", "ro")
    assert_same_instant(capture(point, bench.tmp / "restored-copy"), window, "pit")
    check_live_volume(bench, vol, source, mnt, reports, "pit")


def test_a_backup_reads_the_snapshot_past_the_source_s_page_cache(bench):
    """Imaging a whole volume must not push the machine's cached data out: the daemon reads
    the snapshot's blocks from the source with O_DIRECT, so a backup leaves no more of the
    source in the page cache than the few blocks the freeze itself writes."""
    # Inode tables and journal written by mkfs, not by the kernel in the background after the
    # mount, whose writes through the front would land in the source's page cache meanwhile.
    vol, source, mnt = bench.ext4_volume("uncached", mkfs_options=("-E", "lazy_itable_init=0,lazy_journal_init=0"))
    data = fill_with_data(mnt, 48 * MiB)
    drop_cached(source)
    before = cached_bytes(source)
    out = bench.tmp / "out"
    out.mkdir()
    (result,) = jobs.backup_volumes(["uncached"], jobs.Destination(output=str(out / "uncached.zst")), snapshot="cow",
                                    options=SMALL_CHUNKS)
    assert result.bytes_read >= len(data)
    assert cached_bytes(source) - before < 8 * MiB
    restored = bench.restore(result.image, "restored")
    with open(os.path.join(bench.mount(restored, "restored-mnt", "ro"), "data.bin"), "rb") as f:
        assert f.read() == data


def test_cli_cow_backup_under_writers(bench):
    vol, source, mnt = bench.ext4_volume("clipit")
    writers = Writers(bench, mnt, journal="DELETE")   # the rollback journal this time
    writers.wait_progress(at_least=3)
    out = bench.tmp / "out"
    out.mkdir()
    backup = imager("backup", "--snapshot", "cow", "clipit", "-o", str(out / "clipit.zst"))
    assert backup.returncode == 0, backup.stderr
    assert re.search(r"snapshot \(cow\): filesystems frozen for \d+(\.\d+)? ms", backup.stdout), backup.stdout
    assert "Traceback" not in backup.stderr
    assert_no_snapshot_leftovers([vol], out, {"clipit.zst"})

    restored = bench.restore(str(out / "clipit.zst"), "restored")
    point = bench.mount(restored, "restored-mnt", "ro")
    state = capture(point, bench.tmp / "restored-copy")
    gen = assert_doc_point_in_time(state["doc"])
    max_id = db_summary(state["db"])["max_id"]
    assert max_id > 0 and state["churn"]
    for name, data in state["churn"].items():   # created at most, not yet written: empty
        assert data in (b"", churn_content(int(name[1:]))), name
    newest = max(int(name[1:]) for name in state["churn"])
    # the writers go on past the snapshot; the image shows none of that
    writers.wait_progress(beyond={"doc": gen, "sqlite": max_id, "churn": newest + CHURN_KEEP})
    reports = writers.stop()
    assert gen < reports["doc"]["gen"] and max_id < reports["sqlite"]["max_id"]
    check_live_volume(bench, vol, source, mnt, reports, "clipit")


# -- 2. a snapshot set --------------------------------------------------------------------------

def test_snapshot_set_of_two_volumes_is_one_instant(bench):
    names = ["seta", "setb"]
    volumes, sources, mounts, writers = [], [], [], []
    for name in names:
        vol, source, mnt = bench.ext4_volume(name, 96 * MiB)
        volumes.append(vol)
        sources.append(source)
        mounts.append(mnt)
    for mnt in mounts:
        writers.append(Writers(bench, mnt, journal="WAL"))
    for w in writers:
        w.wait_progress(at_least=3)
    window = {}

    def record():
        for name, mnt, w in zip(names, mounts, writers):
            window[name] = capture(mnt, bench.tmp / f"window-{name}")
            window[name]["progress"] = w.progress()

    out = bench.tmp / "out"
    out.mkdir()
    results = jobs.backup_volumes(names, jobs.Destination(output=str(out)), snapshot="cow", while_frozen=record,
                                  options=SMALL_CHUNKS,
                                  progress=WritesWhileReading(writers, lambda: [window[n] for n in names], names))
    assert [r.image for r in results] == [str(out / f"{n}.zst") for n in names]
    assert_no_snapshot_leftovers(volumes, out, {f"{n}.zst" for n in names})
    reports = []
    for name, w in zip(names, writers):
        w.wait_progress(beyond=window[name]["progress"])
        reports.append(w.stop())
        assert_after_snapshot_differs(reports[-1], window[name])

    headers = []
    for name in names:
        shown = imager("info", "--json", str(out / f"{name}.zst"))
        assert shown.returncode == 0, shown.stderr
        headers.append(json.loads(shown.stdout)["header"])
    for name, header in zip(names, headers):
        assert header["snapshot"]["provider"] == "cow"
        assert header["snapshot"]["volumes"] == names
        assert header["snapshot"]["volume"] == name
    assert headers[0]["snapshot"]["time"] == headers[1]["snapshot"]["time"], \
        [h["snapshot"]["time"] for h in headers]

    for name in names:
        restored = bench.restore(str(out / f"{name}.zst"), f"restored-{name}")
        point = bench.mount(restored, f"restored-mnt-{name}", "ro")
        assert_same_instant(capture(point, bench.tmp / f"restored-copy-{name}"), window[name], name)
    for vol, source, mnt, report, name in zip(volumes, sources, mounts, reports, names):
        check_live_volume(bench, vol, source, mnt, report, name)


def test_failure_after_the_snapshot_leaves_nothing_behind(bench):
    vol, source, mnt = bench.ext4_volume("fail")
    fill_with_data(mnt, 8 * MiB)
    vanishing = bench.tmp / "vanishing"
    vanishing.mkdir()
    taken = []

    def inside_window():
        taken.append(daemon.status("fail").snapshot)
        vanishing.rmdir()  # the destination goes away once the snapshot exists
    with pytest.raises(UsageError, match="no such directory"):
        jobs.backup_volumes(["fail"], jobs.Destination(output=str(vanishing / "fail.zst")), snapshot="cow",
                            while_frozen=inside_window)
    assert taken and taken[0] is not None, "the failure came before the snapshot was taken"
    assert_no_snapshot_leftovers([vol], None)
    assert not vanishing.exists()

    # a destination that fills up half-way through the image (random data does not compress)
    full = bench.tmpfs("full", "1m")
    backup = imager("backup", "--snapshot", "cow", "fail", "-o", os.path.join(full, "fail.zst"))
    one_line_error(backup, "(?i)no space left")
    assert_no_snapshot_leftovers([vol], full)
    # the volume is in use as before
    with open(os.path.join(mnt, "still-writable"), "wb") as f:
        f.write(b"yes")
        os.fsync(f.fileno())


def test_sigterm_during_cow_backup_cleans_up(bench):
    vol, source, mnt = bench.ext4_volume("term")
    fill_with_data(mnt, 64 * MiB)
    out = bench.tmp / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "imager.cli", "backup", "--snapshot", "cow", "term",
                             "-o", str(out / "term.zst"), "--workers", "1", "--level", "19"],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    bench.defer(lambda: kill_process(proc))
    deadline = time.monotonic() + WAIT
    while "term" not in snapshot_names():
        assert proc.poll() is None, f"the backup ended before its snapshot was seen: {proc.communicate()}"
        assert time.monotonic() < deadline, "the backup never created its snapshot"
        time.sleep(0.02)
    # the image is being written under its temporary name
    deadline = time.monotonic() + WAIT
    while not writing_into(proc.pid, out):
        assert proc.poll() is None and time.monotonic() < deadline, "no temporary image appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=WAIT)
    assert proc.returncode == 130, (proc.returncode, stderr)
    assert "interrupted" in stderr and "Traceback" not in stderr, stderr
    assert_no_snapshot_leftovers([vol], out)


# -- 3b. the snapshot goes while it is read -------------------------------------------------------

@pytest.mark.parametrize("what", ["deleted", "replaced", "deleted, to a pipe"])
@pytest.mark.parametrize("reads", ["direct", "daemon"])
def test_a_snapshot_gone_while_it_is_read_fails_the_backup(bench, monkeypatch, caplog, capsysbinary, reads, what):
    """The snapshot is deleted by force once the backup has begun (and maybe a new one taken in
    its place), and the file is rewritten: the rest of the volume, read now, is no longer the
    snapshot. A backup reading the device directly sees no error on its reads, so it must learn
    it from the daemon before the image is complete; one reading through the daemon gets an
    error on its next read. Either way no image: no file, and on a pipe no trailer."""
    monkeypatch.setenv("IMAGER_SNAPSHOT_READS", reads)
    vol, source, mnt = bench.ext4_volume("gone")
    fill_with_data(mnt, 16 * MiB)
    out = bench.tmp / "out"
    out.mkdir()
    after = random.Random(9).randbytes(16 * MiB)
    taken = []

    def delete_and_rewrite(n: int) -> None:
        if taken:
            return
        taken.append(daemon.status("gone").snapshot)
        daemon.snapshot_delete("gone", force=True)
        if what == "replaced":
            bench.defer(lambda: daemon.snapshot_delete("gone", force=True, missing_ok=True))
            daemon.snapshot_create("gone")
        with open(os.path.join(mnt, "data.bin"), "r+b") as f:
            f.write(after)
            os.fsync(f.fileno())

    caplog.set_level("INFO", logger="imager")
    output = "-" if what.endswith("pipe") else str(out / "gone.zst")
    with pytest.raises(ImagerError, match="snapshot of gone"):
        jobs.backup_volumes(["gone"], jobs.Destination(output=output), snapshot="cow",
                            options=SMALL_CHUNKS, progress=delete_and_rewrite)
    assert taken and taken[0] is not None
    through_daemon = "reading the snapshot through its daemon" in caplog.text
    assert through_daemon == (reads == "daemon"), caplog.text
    if what == "replaced":
        assert daemon.status("gone").snapshot.generation == taken[0].generation + 1
        daemon.snapshot_delete("gone", force=True)
    assert_no_snapshot_leftovers([vol], out)
    if output == "-":
        streamed = bench.tmp / "streamed.zst"
        streamed.write_bytes(capsysbinary.readouterr().out)
        assert streamed.stat().st_size > 0, "the stream never began"
        checked = imager("verify", str(streamed))
        assert checked.returncode != 0 and re.search("(?i)incomplete|trailer|truncated", checked.stderr), \
            (checked.returncode, checked.stdout, checked.stderr)


def test_a_wrong_way_of_reading_snapshots_is_a_usage_error(bench):
    vol, source, mnt = bench.ext4_volume("how")
    backup = imager("backup", "--snapshot", "cow", "how", "-o", str(bench.tmp / "how.zst"),
                    env=dict(os.environ, IMAGER_SNAPSHOT_READS="fuse"))
    one_line_error(backup, "IMAGER_SNAPSHOT_READS", "direct or daemon", code=2)
    assert_no_snapshot_leftovers([vol], None)
    assert not (bench.tmp / "how.zst").exists()


# -- 4. the cache fills up ----------------------------------------------------------------------

def test_cache_full_fails_the_backup_and_keeps_every_write(bench):
    source = bench.loop_device(name="small.img")
    state = bench.tmp / "state-small"
    attached = imager("attach", source, "--name", "small", "--cache", str(state), "--cache-size", "1M")
    assert attached.returncode == 0, attached.stderr
    vol = bench.adopt("small")
    subprocess.run(["mkfs.ext4", "-q", "-F", vol.front], check=True)
    mnt = bench.mount(vol.front, "mnt-small")
    old = fill_with_data(mnt, 48 * MiB)
    snapshot_path = os.path.join(vol.run_dir, daemon.MOUNT_DIR_NAME, daemon.SNAPSHOT_FILE)
    writers = Writers(bench, mnt, ("bulk",), extra=snapshot_path)
    out = bench.tmp / "out"
    out.mkdir()
    backup = imager("backup", "--snapshot", "cow", "small", "-o", str(out / "small.zst"),
                    "--workers", "1", "--level", "19")
    line = one_line_error(backup, r"(?i)cache", r"(?i)full")
    needed = re.search(r"at least (\d+) bytes", line)
    assert needed and int(needed.group(1)) > MiB, f"does not say how much cache was needed: {line}"
    writers.stop()
    assert_no_snapshot_leftovers([vol], out)

    new_data = random.Random(7).randbytes(16 * MiB) + old[16 * MiB:]
    after = random.Random(8).randbytes(4 * MiB)
    with open(os.path.join(mnt, "data.bin"), "rb") as f:
        assert f.read() == new_data
    with open(os.path.join(mnt, "after.bin"), "rb") as f:
        assert f.read() == after
    umount_point(mnt)
    daemon.detach("small")
    checked = fsck_clean(source)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    point = bench.mount(source, "live-small", "ro")
    with open(os.path.join(point, "data.bin"), "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(new_data).digest()
    with open(os.path.join(point, "after.bin"), "rb") as f:
        assert f.read() == after


def test_errors_are_one_line_and_lose_nothing(bench):
    one_line_error(imager("attach", str(bench.tmp / "missing"), "--name", "x"), "no such device", code=2)
    one_line_error(imager("attach", str(bench.tmp), "--name", "x"), "is a directory", code=2)
    direct = bench.loop_device(name="direct.img")
    subprocess.run(["mkfs.ext4", "-q", "-F", direct], check=True)
    bench.mount(direct, "direct")
    one_line_error(imager("attach", direct, "--name", "x"), "is mounted at", code=2)
    assert imager("volumes", "--json").stdout and daemon.list_volumes() == []

    esp = gpt_disk_with_esp(bench)
    line = one_line_error(imager("attach", esp, "--name", "esp"), "EFI", "freeze", "none")
    assert "cow" in line
    assert daemon.list_volumes() == []

    vol, source, mnt = bench.ext4_volume("busy")
    with open(os.path.join(mnt, "keep.txt"), "wb") as f:
        f.write(b"keep me")
        os.fsync(f.fileno())
    out = bench.tmp / "out"
    out.mkdir()
    one_line_error(imager("backup", "--snapshot", "cow", "nosuch", "-o", str(out / "x.zst")),
                   "nosuch is not an attached volume", "busy", code=2)
    one_line_error(imager("snapshot", "create", "nosuch"), "no managed volume named 'nosuch'", code=2)
    assert os.listdir(out) == []

    # Another way in to the bytes of a volume in use, a device that cannot be written, a size
    # the front cannot reach whole: refused, nothing attached.
    one_line_error(imager("attach", daemon.status("busy").fuse_file, "--name", "twice"), "is in use through",
                   code=2)
    (bench.tmp / "ro.img").write_bytes(bytes(1 << 20))
    read_only = bench.loop_on(bench.tmp / "ro.img", read_only=True)
    one_line_error(imager("attach", read_only, "--name", "ro"), "is read-only", code=2)
    odd = bench.tmp / "odd.img"
    odd.write_bytes(bytes(582))
    one_line_error(imager("attach", str(odd), "--name", "odd"), "not a multiple of 512", code=2)
    assert [v.name for v in daemon.list_volumes()] == ["busy"]

    created = imager("snapshot", "create", "busy")
    assert created.returncode == 0, created.stderr
    one_line_error(imager("snapshot", "create", "busy"), "already has a snapshot", code=2)
    one_line_error(imager("detach", "busy"), "has a snapshot", code=2)
    assert snapshot_names() == ["busy"]                 # the failed detach kept it
    deleted = imager("snapshot", "delete", "busy")
    assert deleted.returncode == 0, deleted.stderr
    one_line_error(imager("snapshot", "delete", "busy"), "busy has no snapshot", code=2)
    one_line_error(imager("snapshot", "delete", "nosuch"), "no managed volume named 'nosuch'", code=2)
    one_line_error(imager("detach", "busy"), "is mounted at", code=2)
    # Several names: each is checked before any is detached.
    other = bench.loop_device(name="other.img")
    assert imager("attach", other, "--name", "other").returncode == 0
    one_line_error(imager("detach", "other", "nosuch"), "no managed volume named 'nosuch'", code=2)
    one_line_error(imager("detach", "other", "busy"), "is mounted at", code=2)
    assert sorted(v.name for v in daemon.list_volumes()) == ["busy", "other"]
    assert imager("detach", "other").returncode == 0
    assert [v.name for v in daemon.list_volumes()] == ["busy"]
    with open(os.path.join(mnt, "keep.txt"), "rb") as f:
        assert f.read() == b"keep me"
    with open(os.path.join(mnt, "after-errors.txt"), "wb") as f:   # still writable
        f.write(b"ok")
        os.fsync(f.fileno())


