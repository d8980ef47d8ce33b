"""`imager demo`: the main job on a built-in default volume, end to end, cleaned up afterwards.

A loop device becomes a managed volume with a sample ext4 filesystem on its copy-on-write
front; while a writer keeps changing files it is imaged from a snapshot to a seekable zstd
file, the image is verified, restored onto a second loop device, and the restored filesystem
is checked against the files as they were at the snapshot instant; an incremental of what the
writer changed since follows, and one file is taken back from each point of that chain; then
the first job is done again through a virtual tape onto a third loop device.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from devices import loop
from devices.fs import mounts_of

from . import jobs
from .jobs import volumes
from .errors import ImagerError
from .tape import TapeSpec, write_label

SAMPLE_SOURCES = ("/usr/share/doc", "/usr/lib/python3.11/email", "/usr/lib/python3.11/json")
VOLUME_SIZE = 512 << 20


def populate_sample(root: Path, random_mib: int = 8) -> None:
    """Real files: documentation, Python sources, incompressible data and a small text file."""
    for src in SAMPLE_SOURCES:
        if os.path.isdir(src):
            shutil.copytree(src, root / Path(src).name, symlinks=True, dirs_exist_ok=True)
    with open(root / "random.bin", "wb") as f:
        f.write(os.urandom(random_mib << 20))
    (root / "small.txt").write_text("hello imager\n" * 100)
    os.sync()


def file_checksums(root: Path) -> dict[str, str]:
    result = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink() and "lost+found" not in path.parts:
            result[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return result


def _run(*cmd: str) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise ImagerError(f"{' '.join(cmd)} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    return r.stdout


class _Scratch:
    """Loop devices and mounts the demo creates, undone in reverse order whatever happens."""

    def __init__(self, stack: ExitStack, directory: Path):
        self.stack = stack
        self.directory = directory

    def loop_device(self, name: str, size: int) -> str:
        path = self.directory / name
        with open(path, "wb") as f:
            f.truncate(size)
        dev = loop.attach(str(path))
        self.stack.callback(loop.detach, dev)
        return dev

    def mount(self, dev: str, name: str, *options: str) -> Path:
        point = self.directory / name
        point.mkdir(exist_ok=True)
        _run("mount", *(["-o", ",".join(options)] if options else []), dev, str(point))
        self.stack.callback(self._umount, dev)
        return point

    @staticmethod
    def _umount(dev: str) -> None:
        for m in mounts_of(dev):
            subprocess.run(["umount", m.mount_point], capture_output=True)


def _check_restored(scratch: _Scratch, device: str, expected: dict[str, str], name: str) -> None:
    _run("fsck.ext4", "-n", "-f", device)
    got = file_checksums(scratch.mount(device, name, "ro"))
    if got != expected:
        differing = sorted(set(expected) ^ set(got)) or [k for k in expected if got.get(k) != expected[k]]
        raise ImagerError(f"demo: restored files on {device} differ from the originals: {differing[:3]}")


class _Writer:
    """An application that keeps changing files while the volume is imaged: a counter rewritten
    in place, a growing journal, short-lived files created and deleted."""

    def __init__(self, root: Path):
        self.root = root
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="demo-writer", daemon=True)
        self.writes = 0

    def _run(self) -> None:
        counter = self.root / "app" / "counter.txt"
        counter.parent.mkdir(exist_ok=True)
        with open(counter, "w+b") as c, open(self.root / "app" / "journal.log", "ab") as journal:
            while not self.stop.is_set():
                self.writes += 1
                n = self.writes
                c.seek(0)
                c.write(f"{n:012d}\n".encode() * 512)
                journal.write(f"entry {n}\n".encode())
                (self.root / "app" / f"tmp-{n}").write_bytes(os.urandom(4096))
                if n > 3:
                    (self.root / "app" / f"tmp-{n - 3}").unlink()
                if n % 50 == 0:
                    os.fsync(c.fileno())

    def snapshot_instant(self) -> dict[str, str]:
        """Checksums of what the writer has on the (frozen) filesystem right now."""
        return {f"app/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest()
                for p in (self.root / "app").iterdir()}

    def __enter__(self) -> "_Writer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def run(out) -> int:
    """Run the demo, printing each step; returns the exit status."""
    def say(message: str) -> None:
        if not out.quiet:
            print(message, file=sys.stderr if out.json else sys.stdout, flush=True)

    summary: dict = {}
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="imager-demo-"))
    name = f"imager-demo-{os.getpid()}"
    try:
        with ExitStack() as stack:
            scratch = _Scratch(stack, workdir)
            source = scratch.loop_device("source.img", VOLUME_SIZE)
            volume = volumes.attach(source, name=name, cache_path=str(workdir / "cow-state"))
            stack.callback(volumes.detach, name)
            _run("mkfs.ext4", "-q", "-L", "imager-demo", volume.front)
            point = scratch.mount(volume.front, "live")
            populate_sample(point, random_mib=64)
            sample = file_checksums(point)
            say(f"1. sample volume {source} ({VOLUME_SIZE >> 20} MiB) attached as {name!r}: ext4 on its "
                f"copy-on-write front {volume.front}, mounted, {len(sample)} files")
            full = _image_file(scratch, workdir, name, point, sample, say, summary)
            _chain(workdir, name, point, full, say, summary)
            _image_tape(scratch, workdir, name, point, sample, say, summary)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary["seconds"] = round(time.monotonic() - started, 2)
    if out.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        say(f"demo ok in {summary['seconds']} s (everything it created has been removed)")
    return 0


def _image_file(scratch: "_Scratch", workdir: Path, name: str, point: Path, sample: dict[str, str], say,
                summary: dict) -> "_Point":
    """Steps 2-5: back up from a snapshot while a writer runs, verify, restore, check every file."""
    image = workdir / "source.zst"
    with _Writer(point) as writer:
        at_instant: dict[str, str] = {}
        (b,) = jobs.backup_volumes([name], jobs.Destination(output=str(image)), snapshot="cow",
                                   while_frozen=lambda: at_instant.update(writer.snapshot_instant()))
        written_during = writer.writes
    expected = dict(sample, **at_instant)
    say(f"2. backup from a cow snapshot while a writer made {written_during} changes: "
        f"frozen {b.freeze_window_ms:.1f} ms; {b.volume_size >> 20} MiB -> "
        f"{b.bytes_written / 2**20:.1f} MiB (ratio {b.ratio:.2f}), {b.bytes_read >> 20} MiB read "
        f"(used blocks only) in {b.seconds:.2f} s, {b.mb_per_second:.0f} MB/s")
    summary["backup"] = b.to_dict()
    v = jobs.verify(str(image))
    say(f"3. verify: {v.chunks} chunks ok in {v.seconds:.2f} s")
    target = scratch.loop_device("target.img", VOLUME_SIZE)
    r = jobs.restore(str(image), target, verify=True)
    say(f"4. restore onto {target} with read-back verify: {r.seconds:.2f} s, {r.mb_per_second:.0f} MB/s")
    summary["restore"] = r.to_dict()
    _check_restored(scratch, target, expected, "restored")
    say(f"5. restored filesystem passes fsck -n; all {len(expected)} files are as they were at the "
        f"snapshot instant, the writer's files included")
    return _Point(image, expected, b.bytes_written)


# The writer's file that every step changes in place: taken back from each point of the chain.
CHANGING_FILE = "app/counter.txt"


@dataclass
class _Point:
    """An image of the demo's chain: its file, the checksum of every file at its snapshot
    instant, its size."""
    image: Path
    files: dict[str, str]
    bytes_written: int


def _chain(workdir: Path, name: str, point: Path, full: _Point, say, summary: dict) -> None:
    """Steps 6-7: an incremental of what the writer changed since the full (the volume's change
    tracker says which blocks), and one file taken back from each point of the chain."""
    incremental = workdir / "source-2.zst"
    with _Writer(point) as writer:
        at_instant: dict[str, str] = {}
        (i,) = jobs.backup_volumes([name], jobs.Destination(output=str(incremental)), snapshot="cow",
                                   options=jobs.ImagingOptions(incremental=True, parent=str(full.image)),
                                   while_frozen=lambda: at_instant.update(writer.snapshot_instant()))
    if i.kind != "incremental":
        raise ImagerError(f"demo: the second backup was a {i.kind}, not an incremental: {i.reason}")
    say(f"6. incremental from a new snapshot, parent {full.image.name}, writer still running: the volume's "
        f"change tracker gave {i.changed_blocks} changed blocks; {i.bytes_written / 2**20:.1f} MiB written "
        f"(the full: {full.bytes_written / 2**20:.1f} MiB) in {i.seconds:.2f} s")
    summary["incremental"] = i.to_dict()
    for image, instant in ((full.image, full.files), (incremental, at_instant)):
        dest = workdir / f"back-from-{image.stem}"
        dest.mkdir()
        jobs.extract(str(image), [CHANGING_FILE], str(dest))
        got = hashlib.sha256((dest / CHANGING_FILE).read_bytes()).hexdigest()
        if got != instant[CHANGING_FILE]:
            raise ImagerError(f"demo: {CHANGING_FILE} taken back from {image} is not as it was at that "
                              f"snapshot instant")
    say(f"7. {CHANGING_FILE}, rewritten by the writer all along, taken back from each point of the chain "
        f"(imager extract, no restore of the volume): as it was at the full's instant and at the "
        f"incremental's")


def _image_tape(scratch: "_Scratch", workdir: Path, name: str, point: Path, sample: dict[str, str], say,
                summary: dict) -> None:
    """Steps 8-9: the first job again, through a labelled virtual tape."""
    tape = TapeSpec(str(workdir / "demo.tap"))
    with tape.open() as drive:
        write_label(drive, "DEMO01")
    with _Writer(point) as writer:
        at_instant: dict[str, str] = {}
        (t,) = jobs.backup_volumes([name], jobs.Destination(tape=tape), snapshot="cow",
                                   while_frozen=lambda: at_instant.update(writer.snapshot_instant()))
    say(f"8. backup from a new snapshot to virtual tape {tape.spec} ({t.image}), writer still "
        f"running: {t.seconds:.2f} s, {t.mb_per_second:.0f} MB/s")
    summary["tape_backup"] = t.to_dict()
    tape_target = scratch.loop_device("tape-target.img", VOLUME_SIZE)
    tr = jobs.restore_from_tape(tape, t.image_id, tape_target, verify=True)
    _check_restored(scratch, tape_target, dict(sample, **at_instant), "from-tape")
    say(f"9. restore from tape onto {tape_target} with read-back verify: {tr.seconds:.2f} s; "
        f"fsck -n passes, every file as at that snapshot's instant")
    summary["tape_restore"] = tr.to_dict()
