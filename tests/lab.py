"""The rig of the tests that run volumes in use: loop devices, managed volumes with their
daemons, mounts, writer processes that write while a backup reads, and what a filesystem held at
an instant. Everything a test sets up is undone at teardown in reverse order, also when the test
fails half-way."""

from __future__ import annotations

import contextlib
import ctypes
import glob
import hashlib
import json
import mmap
import os
import random
import re
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time

import pytest

from devices import loop
from devices.discover import ESP_GPT_TYPE
from imager import jobs
from imager.errors import ImagerError
from imager.spawn import exit_watch, has_exited
from imager.snapshot import daemon

from conftest import REPO_ROOT, fsck_clean, imager

MiB = 1 << 20
VOLUME_SIZE = 128 * MiB
XFS_MIN_SIZE = 320 * MiB    # mkfs.xfs refuses below 300 MiB
WAIT = 60.0                     # upper bound for any condition a test waits on

DAEMON_TESTS = [
    pytest.mark.skipif(
        not (os.access("/dev/loop-control", os.W_OK) and os.access("/dev/fuse", os.W_OK)
             and shutil.which("mkfs.ext4") and shutil.which("fsfreeze")),
        reason="needs root, /dev/loop-control, /dev/fuse, e2fsprogs and util-linux"),
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
        self._undo.append(lambda: detach_loop(device))
        return device

    def loop_on(self, path, read_only=True, **options) -> str:
        device = loop.attach(str(path), read_only=read_only, **options)
        self._undo.append(lambda: detach_loop(device))
        return device

    def attach(self, device, name, **options) -> daemon.VolumeInfo:
        options.setdefault("cache_path", str(self.tmp / f"state-{name}"))
        info = daemon.attach(device, name=name, **options)
        self._undo.append(lambda: stop_volume(info))
        return info

    def mount(self, device, where, *options) -> str:
        point = self.tmp / where
        point.mkdir(exist_ok=True)
        command = ["mount"] + (["-o", ",".join(options)] if options else []) + [device, str(point)]
        subprocess.run(command, check=True)
        self._undo.append(lambda: umount_point(point))
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


def umount_point(point):
    if os.path.ismount(point):
        if subprocess.run(["umount", str(point)]).returncode != 0:
            subprocess.run(["umount", "-l", str(point)], check=True)


def detach_loop(device):
    if any(info.device == device for info in loop.list_attached()):
        loop.detach(device)


def stop_volume(info: daemon.VolumeInfo):
    if info.name not in [v.name for v in daemon.list_volumes()]:
        return
    try:
        daemon.snapshot_delete(info.name, force=True, missing_ok=True)
        daemon.detach(info.name)
        return
    except ImagerError:
        pass
    # Last resort for the daemon this test started: kill it by pid, then clear what it held.
    kill_and_wait(info.pid)
    if info.front:
        detach_loop(info.front)
    subprocess.run(["umount", "-l", os.path.join(info.run_dir, daemon.MOUNT_DIR_NAME)],
                   stderr=subprocess.DEVNULL)
    daemon.detach(info.name)  # what the dead daemon left in its run directory


def wait_for(condition, timeout: float = WAIT) -> bool:
    """Until condition() holds (True) or `timeout` seconds have passed (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def wait_until(condition, what: str = "the condition") -> None:
    """Until condition() holds; fails naming `what` after WAIT seconds."""
    assert wait_for(condition), f"waited {WAIT:.0f} s for {what}"


def kill_and_wait(pid, sig=signal.SIGKILL, timeout=10):
    with exit_watch(pid) as watch:
        if watch is None:
            return
        os.kill(pid, sig)
        assert has_exited(watch, timeout), f"process {pid} did not exit"


def lab_setup(tmp_path, monkeypatch):
    """The `lab` fixture's body."""
    # A short run directory: a Unix socket path must fit in 107 bytes.
    run_dir = tempfile.mkdtemp(prefix="imgr-", dir="/tmp")
    monkeypatch.setenv(daemon.RUN_DIR_ENV, run_dir)
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


def write_file(path, data, *, in_place=False):
    with open(path, "r+b" if in_place else "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# -- what the writers write (the writer processes below carry the same three definitions) -------

BLOCK = 4096
DOC_BLOCKS = 256                # doc.bin: 1 MiB rewritten block by block in place
ROWS_PER_TX = 5                 # SQLite: rows inserted per transaction
CHURN_KEEP = 16                 # churn/: files alive at once


def doc_block(gen: int, index: int) -> bytes:
    unit = b"gen %08d block %05d\n" % (gen, index)
    return (unit * (BLOCK // len(unit) + 1))[:BLOCK]


def row_payload(n: int) -> bytes:
    return hashlib.sha256(b"row %d" % n).digest() * 8


def churn_content(n: int) -> bytes:
    return (b"file %d\n" % n) * (1 + n % 300)


WRITER = r'''
import hashlib, json, os, random, sqlite3, sys, time

kind, root, stop_file, status_file, extra = sys.argv[1:6]
BLOCK, DOC_BLOCKS, ROWS_PER_TX, CHURN_KEEP = 4096, 256, 5, 16

def doc_block(gen, index):
    unit = b"gen %08d block %05d\n" % (gen, index)
    return (unit * (BLOCK // len(unit) + 1))[:BLOCK]

def row_payload(n):
    return hashlib.sha256(b"row %d" % n).digest() * 8

def churn_content(n):
    return (b"file %d\n" % n) * (1 + n % 300)

status_fd = os.open(status_file, os.O_WRONLY | os.O_CREAT, 0o644)

def progress(n):
    os.pwrite(status_fd, b"%20d" % n, 0)

def stopping():
    return os.path.exists(stop_file)

def report(data):
    with open(status_file + ".json.tmp", "w") as f:
        json.dump(data, f)
    os.replace(status_file + ".json.tmp", status_file + ".json")

if kind == "doc":
    # A document editor: the same file rewritten block by block in place, fsync now and then.
    path = os.path.join(root, "doc.bin")
    with open(path, "wb") as f:
        for i in range(DOC_BLOCKS):
            f.write(doc_block(0, i))
        f.flush()
        os.fsync(f.fileno())
    gen = 0
    with open(path, "r+b", buffering=0) as f:
        while not stopping():
            gen += 1
            for i in range(DOC_BLOCKS):
                os.pwrite(f.fileno(), doc_block(gen, i), i * BLOCK)
                if i % 16 == 15:
                    os.fsync(f.fileno())
            progress(gen)
    report({"gen": gen})

elif kind == "sqlite":
    db = sqlite3.connect(os.path.join(root, "db.sqlite"), isolation_level=None, timeout=60)
    mode = db.execute("PRAGMA journal_mode=%s" % extra).fetchone()[0]
    assert mode == extra.lower(), mode
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS rows (id INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
    n = 0
    while not stopping():
        db.execute("BEGIN IMMEDIATE")
        for _ in range(ROWS_PER_TX):
            n += 1
            db.execute("INSERT INTO rows VALUES (?, ?)", (n, row_payload(n)))
        db.execute("COMMIT")
        progress(n)
    db.close()
    report({"max_id": n})

elif kind == "churn":
    directory = os.path.join(root, "churn")
    os.makedirs(directory, exist_ok=True)
    n = 0
    while not stopping():
        n += 1
        with open(os.path.join(directory, "f%07d" % n), "wb") as f:
            f.write(churn_content(n))
            if n % 8 == 0:
                f.flush()
                os.fsync(f.fileno())
        if n > CHURN_KEEP:
            os.unlink(os.path.join(directory, "f%07d" % (n - CHURN_KEEP)))
        progress(n)
    report({"files": ["f%07d" % i for i in range(max(1, n - CHURN_KEEP + 1), n + 1)]})

elif kind == "bulk":
    # Waits for the snapshot to exist (extra: the path of the snapshot file), then rewrites the
    # first 16 MiB of data.bin in place and writes a new 4 MiB file: far more than a 1 MiB cache.
    deadline = time.monotonic() + 60
    while not os.path.exists(extra):
        if time.monotonic() > deadline:
            sys.exit("no snapshot appeared")
        time.sleep(0.005)
    progress(1)
    with open(os.path.join(root, "data.bin"), "r+b") as f:
        f.write(random.Random(7).randbytes(16 << 20))
        f.flush()
        os.fsync(f.fileno())
    with open(os.path.join(root, "after.bin"), "wb") as f:
        f.write(random.Random(8).randbytes(4 << 20))
        f.flush()
        os.fsync(f.fileno())
    progress(2)
    report({"done": True})
else:
    sys.exit("unknown writer " + kind)
'''


class Writers:
    """Writer processes on one filesystem; stopped (or killed) at teardown in any case."""

    def __init__(self, bench: "Bench", root: str, kinds=("doc", "sqlite", "churn"), *,
                 journal: str = "WAL", extra: str | None = None):
        self.root = root
        tag = f"w{len(bench.writer_groups)}"
        bench.writer_groups.append(self)
        self.stop_file = str(bench.tmp / f"{tag}.stop")
        self.status = {}
        self.procs = {}
        self.logs = {}
        for kind in kinds:
            self.status[kind] = str(bench.tmp / f"{tag}-{kind}.status")
            self.logs[kind] = str(bench.tmp / f"{tag}-{kind}.log")
            arg = extra if extra is not None else journal
            with open(self.logs[kind], "wb") as log:
                proc = subprocess.Popen([sys.executable, "-c", WRITER, kind, root, self.stop_file,
                                         self.status[kind], arg], stdout=log, stderr=log,
                                        stdin=subprocess.DEVNULL)
            self.procs[kind] = proc
            bench.defer(lambda p=proc: kill_process(p))

    def progress(self) -> dict[str, int]:
        result = {}
        for kind, path in self.status.items():
            try:
                with open(path, "rb") as f:
                    text = f.read(20).strip()
            except FileNotFoundError:
                text = b""
            result[kind] = int(text) if text else 0
        return result

    def _check_alive(self) -> None:
        for kind, proc in self.procs.items():
            if proc.poll() is not None and not os.path.exists(self.status[kind] + ".json"):
                raise AssertionError(f"writer {kind} died (exit {proc.returncode}): {self.log(kind)}")

    def log(self, kind: str) -> str:
        with open(self.logs[kind], errors="replace") as f:
            return f.read()[-2000:]

    def wait_progress(self, beyond: dict[str, int] | None = None, at_least: int = 2) -> dict[str, int]:
        """Wait until every writer has done `at_least` units, and more than in `beyond`."""
        deadline = time.monotonic() + WAIT
        while True:
            now = self.progress()
            if all(now[k] >= at_least and now[k] > (beyond or {}).get(k, -1) for k in now):
                return now
            self._check_alive()
            assert time.monotonic() < deadline, f"writers made no progress: {now} (needed beyond {beyond})"
            time.sleep(0.02)

    def stop(self) -> dict[str, dict]:
        """Ask every writer to stop at a clean point; their reports of what the files now hold."""
        with open(self.stop_file, "w"):
            pass
        reports = {}
        for kind, proc in self.procs.items():
            try:
                proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"writer {kind} did not stop: {self.log(kind)}") from None
            assert proc.returncode == 0, f"writer {kind} failed: {self.log(kind)}"
            with open(self.status[kind] + ".json") as f:
                reports[kind] = json.load(f)
        return reports


def kill_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(WAIT)


class Bench(Lab):
    """test_front's Lab plus writers, CLI-attached volumes, frozen filesystems and tmpfs mounts."""

    def __init__(self, tmp_path):
        super().__init__(tmp_path)
        self.writer_groups: list[Writers] = []

    def defer(self, undo) -> None:
        self._undo.append(undo)

    def ext4_volume(self, name: str, size: int = VOLUME_SIZE, *, fs: str = "ext4", mkfs_options: tuple = (),
                    **attach_options):
        """An attached volume with ext4 (or `fs`: xfs) on its front, mounted: (volume info,
        source, mount point)."""
        if fs == "xfs":
            size = max(size, XFS_MIN_SIZE)
        source = self.loop_device(size, name=f"{name}.img")
        vol = self.attach(source, name, **attach_options)
        subprocess.run(["mkfs.xfs", "-q", "-f", *mkfs_options, vol.front] if fs == "xfs"
                       else ["mkfs.ext4", "-q", "-F", *mkfs_options, vol.front], check=True)
        return vol, source, self.mount(vol.front, f"mnt-{name}")

    def plain_ext4(self, name: str, size: int = VOLUME_SIZE) -> tuple[str, str]:
        """A loop device with ext4, mounted, not attached: (device, mount point). Thawed at
        teardown before anything else is undone, should a test leave it frozen."""
        device = self.loop_device(size, name=f"{name}.img")
        subprocess.run(["mkfs.ext4", "-q", "-F", device], check=True)
        point = self.mount(device, f"mnt-{name}")
        return device, point

    def thaw_at_teardown(self, point: str) -> None:
        self.defer(lambda: subprocess.run(["fsfreeze", "-u", point], capture_output=True))

    def adopt(self, name: str) -> daemon.VolumeInfo:
        """Register a volume attached through the CLI for teardown."""
        info = daemon.status(name)
        self.defer(lambda: stop_volume(info))
        return info

    def restore(self, image: str, name: str) -> str:
        """The image restored onto a fresh loop device; fsck -n must pass. Returns the device."""
        size = jobs.info(image).header.volume_size
        target = self.loop_device(size, name=f"{name}.img")
        jobs.restore(image, target)
        checked = fsck_clean(target)
        assert checked.returncode == 0, f"fsck of the restored {image}: {checked.stdout}{checked.stderr}"
        return target

    def tmpfs(self, where: str, size: str) -> str:
        point = self.tmp / where
        point.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], check=True)
        self.defer(lambda: umount_point(point))
        return str(point)


def bench_setup(tmp_path, monkeypatch):
    """The `bench` fixture's body, for other test modules' fixtures."""
    # A short run directory: a Unix socket path must fit in 107 bytes.
    run_dir = tempfile.mkdtemp(prefix="imgr-", dir="/tmp")
    monkeypatch.setenv(daemon.RUN_DIR_ENV, run_dir)
    monkeypatch.setenv(daemon.STATE_DIR_ENV, str(tmp_path / "state"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p))
    b = Bench(tmp_path)
    try:
        yield b
    finally:
        try:
            b.close()
        finally:
            leftovers = [root for root, _, _ in os.walk(run_dir) if os.path.ismount(root)]
            shutil.rmtree(run_dir, ignore_errors=True)
        assert not leftovers, f"still mounted after teardown: {leftovers}"


# -- the CLI --------------------------------------------------------------------------------------

def one_line_error(result: subprocess.CompletedProcess, *patterns: str, code: int = 1) -> str:
    """The command failed with exit `code` (1 a failed job, 2 a wrong command line) and one line
    on stderr, no traceback; returns that line."""
    assert result.returncode == code, f"exit {result.returncode}: {result.stdout}{result.stderr}"
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("imager: error: "), lines[0]
    for pattern in patterns:
        assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"
    return lines[0]


def snapshot_names() -> list[str]:
    listed = imager("snapshot", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    return [s["name"] for s in json.loads(listed.stdout)["snapshots"]]


# -- what a filesystem holds ----------------------------------------------------------------------

def capture(root: str, copy_dir) -> dict:
    """What the writers' files hold now: the document's bytes, a copy of the SQLite database
    files (db, -wal, -journal, not -shm) and every churn file with its bytes."""
    os.makedirs(copy_dir)
    state = {"db": None, "doc": None, "churn": None}
    doc = os.path.join(root, "doc.bin")
    if os.path.exists(doc):
        with open(doc, "rb") as f:
            state["doc"] = f.read()
    if os.path.exists(os.path.join(root, "db.sqlite")):
        for suffix in ("", "-wal", "-journal"):
            path = os.path.join(root, "db.sqlite" + suffix)
            if os.path.exists(path):
                shutil.copyfile(path, os.path.join(copy_dir, "db.sqlite" + suffix))
        state["db"] = os.path.join(copy_dir, "db.sqlite")
    churn = os.path.join(root, "churn")
    if os.path.isdir(churn):
        state["churn"] = {}
        for name in sorted(os.listdir(churn)):
            with open(os.path.join(churn, name), "rb") as f:
                state["churn"][name] = f.read()
    return state


def doc_generations(data: bytes) -> list[int]:
    """The generation of each block of doc.bin; every block must be exactly one the writer wrote."""
    assert len(data) == DOC_BLOCKS * BLOCK, len(data)
    gens = []
    for i in range(DOC_BLOCKS):
        block = data[i * BLOCK:(i + 1) * BLOCK]
        m = re.match(rb"gen (\d{8}) block (\d{5})\n", block)
        assert m and int(m.group(2)) == i and block == doc_block(int(m.group(1)), i), \
            f"block {i} of doc.bin is torn or foreign: {block[:40]!r}"
        gens.append(int(m.group(1)))
    return gens


def assert_doc_point_in_time(data: bytes) -> int:
    """Blocks are rewritten in order, so any instant shows blocks 0..k-1 at generation g and the
    rest at g-1. Returns the highest generation."""
    gens = doc_generations(data)
    top = gens[0]
    k = gens.index(top - 1) if top - 1 in gens else DOC_BLOCKS
    assert gens == [top] * k + [top - 1] * (DOC_BLOCKS - k), f"doc.bin is not from one instant: {gens}"
    return top


def db_summary(path: str) -> dict:
    """Open (a copy of) the database, letting SQLite recover its journal or WAL as it would on
    the restored filesystem; integrity, highest id and a digest of every row."""
    db = sqlite3.connect(path)
    try:
        integrity = db.execute("PRAGMA integrity_check").fetchall()
        rows = db.execute("SELECT id, payload FROM rows ORDER BY id").fetchall()
    finally:
        db.close()
    assert integrity == [("ok",)], integrity
    ids = [r[0] for r in rows]
    assert ids == list(range(1, len(ids) + 1)), "rows missing in the middle"
    assert all(payload == row_payload(i) for i, payload in rows), "a row's payload is wrong"
    assert len(ids) % ROWS_PER_TX == 0, f"{len(ids)} rows: a transaction is half there"
    digest = hashlib.sha256(b"".join(b"%d:" % i + p for i, p in rows)).hexdigest()
    return {"max_id": ids[-1] if ids else 0, "digest": digest}


def assert_same_instant(restored: dict, window: dict, label: str) -> None:
    """The restored filesystem holds exactly what was read inside the freeze window."""
    if window["doc"] is not None:
        assert_doc_point_in_time(window["doc"])
        assert restored["doc"] == window["doc"], (
            f"{label}: doc.bin differs from the freeze window: restored generations "
            f"{sorted(set(doc_generations(restored['doc'])))}, window {sorted(set(doc_generations(window['doc'])))}")
    if window["db"] is not None:
        assert restored["db"] is not None, f"{label}: the database is missing"
        assert db_summary(restored["db"]) == db_summary(window["db"]), f"{label}: the database differs"
    if window["churn"] is not None:
        assert sorted(restored["churn"]) == sorted(window["churn"]), f"{label}: another set of churn files"
        assert restored["churn"] == window["churn"], f"{label}: a churn file's content differs"


def assert_final_content(root: str, reports: dict, copy_dir) -> None:
    """The filesystem at `root` holds every write the writers made (their final state)."""
    state = capture(root, copy_dir)
    if "doc" in reports:
        gen = reports["doc"]["gen"]
        assert doc_generations(state["doc"]) == [gen] * DOC_BLOCKS
    if "sqlite" in reports:
        assert db_summary(state["db"])["max_id"] == reports["sqlite"]["max_id"]
    if "churn" in reports:
        assert sorted(state["churn"]) == reports["churn"]["files"]
        assert all(data == churn_content(int(name[1:])) for name, data in state["churn"].items())


def assert_after_snapshot_differs(reports: dict, window: dict) -> None:
    """The writers went on after the snapshot: what the image must not hold exists."""
    if "doc" in reports:
        assert reports["doc"]["gen"] > max(doc_generations(window["doc"]))
    if "sqlite" in reports:
        assert reports["sqlite"]["max_id"] > db_summary(window["db"])["max_id"]
    if "churn" in reports:
        assert reports["churn"]["files"] != sorted(window["churn"])


def check_live_volume(bench: Bench, vol: daemon.VolumeInfo, source: str, mount_point: str,
                      reports: dict, label: str, fs: str = "ext4") -> None:
    """Unmount the front, detach, fsck the source and find every write on it."""
    umount_point(mount_point)
    daemon.detach(vol.name)
    checked = fsck_clean(source, fs)
    assert checked.returncode == 0, f"fsck of the live {label}: {checked.stdout}{checked.stderr}"
    point = bench.mount(source, f"live-{label}", "ro")
    assert_final_content(point, reports, bench.tmp / f"live-{label}-copy")
    umount_point(point)


def assert_no_snapshot_leftovers(volumes: list[daemon.VolumeInfo], output_dir, expected: set[str] = frozenset()):
    """No snapshot, no cache data, and in the output directory only the expected images."""
    assert snapshot_names() == []
    for v in volumes:
        assert daemon.status(v.name).snapshot is None
        assert not os.path.exists(os.path.join(v.run_dir, daemon.MOUNT_DIR_NAME, daemon.SNAPSHOT_FILE))
        cache = os.path.join(v.state_dir, "cache")
        assert not os.path.exists(cache) or os.path.getsize(cache) == 0, f"{cache} still holds data"
        index = os.path.join(v.state_dir, "index")
        if os.path.exists(index):
            with open(index, "rb") as f:
                assert not any(f.read()), f"{index} still maps blocks to the deleted cache"
    if output_dir is not None:
        assert set(os.listdir(output_dir)) == set(expected), os.listdir(output_dir)



# -- a backup while writers write ---------------------------------------------------------------

# Small chunks and one worker: the pipeline reads only a few hundred KiB ahead of the first
# progress call, so nearly all of the volume is read after the wait below.
SMALL_CHUNKS = jobs.ImagingOptions(chunk_size=256 << 10, workers=1)


class WritesWhileReading:
    """A progress callback that, when the first chunk of the image is written (the snapshot is
    taken and thawed, the rest of the volume not yet read), waits until every writer has gone
    on well past what it had done in the freeze window: each document block rewritten twice,
    more transactions committed, files created and deleted. The image must not show any of it."""

    def __init__(self, groups: list[Writers], windows, names: list[str]):
        # windows(): what each group's filesystem held in the freeze window (filled in there)
        self.groups, self.windows, self.names = groups, windows, names
        self.waited = False

    def __call__(self, n: int) -> None:
        if self.waited:
            return
        self.waited = True
        for group, window in zip(self.groups, self.windows()):
            seen = window["progress"]
            group.wait_progress(beyond={k: v + (1 if k == "doc" else CHURN_KEEP) for k, v in seen.items()})
        for name in self.names:
            snap = daemon.status(name).snapshot
            assert snap is not None and snap.changed_blocks > 0 and snap.cache_bytes_used > 0, snap


@contextlib.contextmanager
def _mapped(fd: int, length: int):
    """The address of a read-only shared map of the first `length` bytes of `fd`."""
    from devices.libc import check, libc
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    address = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if address == ctypes.c_void_p(-1).value:
        check(-1, "mmap")
    try:
        yield address
    finally:
        libc.munmap(address, length)


def cached_bytes(device: str) -> int:
    """How much of `device` is in the page cache now (mincore over a read-only map of it). Only
    meaningful while something else holds the device open: the last close drops its cache."""
    from devices.libc import check, libc
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    fd = os.open(device, os.O_RDONLY)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        with _mapped(fd, size) as address:
            pages = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
            check(libc.mincore(address, size, pages), f"mincore {device}")
        return sum(p & 1 for p in pages) * mmap.PAGESIZE
    finally:
        os.close(fd)


def dirty_bytes(fd: int, length: int) -> int:
    """How much of the first `length` bytes of the file `fd` is in the page cache modified and
    not yet on its way to the disk (each page's dirty flag in /proc/kpageflags)."""
    page = mmap.PAGESIZE
    kpf_dirty, present, pfn_mask = 1 << 4, 1 << 63, (1 << 55) - 1
    dirty = 0
    with _mapped(fd, length) as address, open("/proc/self/pagemap", "rb") as pagemap, \
            open("/proc/kpageflags", "rb") as kpageflags:
        count = length // page
        for n in range(count):
            ctypes.string_at(address + n * page, 1)          # mapped in, from the page cache
        pagemap.seek(address // page * 8)
        entries = struct.unpack(f"<{count}Q", pagemap.read(count * 8))
        for entry in entries:
            if entry & present:
                kpageflags.seek((entry & pfn_mask) * 8)
                if struct.unpack("<Q", kpageflags.read(8))[0] & kpf_dirty:
                    dirty += page
    return dirty


def fill_with_data(mnt: str, size: int, name: str = "data.bin") -> bytes:
    data = random.Random(size).randbytes(size)
    with open(os.path.join(mnt, name), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return data


def gpt_disk_with_esp(bench: Bench) -> str:
    """A GPT disk image with an EFI system partition, attached whole with its partitions added
    by partx; returns the ESP's partition device."""
    for tool in ("sfdisk", "partx"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is missing")
    image = bench.tmp / "gpt.img"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    table = (f"label: gpt\nstart=2048, size=32768, type={ESP_GPT_TYPE.upper()}, name=\"EFI\"\n"
             f"start=34816, size=65536, type=0fc63daf-8483-4772-8e3d-693d7de4709e\n")
    disk = _disk_with_partitions(bench, image, table)
    name = os.path.basename(disk)
    deadline = time.monotonic() + 10
    while True:
        for part in glob.glob(f"/sys/class/block/{name}/{name}p*"):
            with open(os.path.join(part, "partition")) as f:
                if int(f.read()) == 1 and os.path.exists("/dev/" + os.path.basename(part)):
                    return "/dev/" + os.path.basename(part)
        assert time.monotonic() < deadline, f"partx added no partition devices for {disk}"
        time.sleep(0.05)


def _disk_with_partitions(bench: Bench, image, table: str) -> str:
    """`image` partitioned by the sfdisk script `table`, on a loop device whose partitions partx
    adds (the kernel here parses no table); the loop device."""
    subprocess.run(["sfdisk", "-q", str(image)], input=table, text=True, check=True, capture_output=True)
    disk = bench.loop_on(image, read_only=False)
    bench.defer(lambda: subprocess.run(["partx", "-d", disk], capture_output=True))
    added = subprocess.run(["partx", "-a", disk], capture_output=True, text=True)
    if added.returncode != 0:
        pytest.skip(f"partx -a does not add partitions here: {added.stderr.strip()}")
    return disk


def partitioned_disk(bench: Bench, *sizes: int) -> list[str]:
    """A GPT disk of partitions of `sizes` bytes (the first at 1 MiB) on a loop device, each its
    own device (partx): [disk, partition 1, ...]."""
    if shutil.which("partx") is None or shutil.which("sfdisk") is None:
        pytest.skip("needs sfdisk and partx")
    image = bench.tmp / "disk.img"
    with open(image, "wb") as f:
        f.truncate(sum(sizes) + 4 * MiB)
    table, start = "label: gpt\n", 2048
    for size in sizes:
        table += f"start={start}, size={size // 512}\n"
        start += size // 512
    disk = _disk_with_partitions(bench, image, table)
    parts = [f"{disk}p{n + 1}" for n in range(len(sizes))]
    wait_until(lambda: all(os.path.exists(p) for p in parts), "the partition devices")
    return [disk, *parts]


def damage_chunk(image, chunk: int) -> None:
    """Flip one bit in the middle of the frame of chunk `chunk` of the image file (a disk's
    damage): its checksum and digest no longer match."""
    from imager.format import ImageReader
    with ImageReader(str(image)) as reader:
        where = reader.chunk_offsets[chunk] + reader.chunk_frame_sizes[chunk] // 2
    with open(image, "r+b") as f:
        f.seek(where)
        byte = f.read(1)[0]
        f.seek(where)
        f.write(bytes([byte ^ 0x40]))
