"""Real loop devices and real filesystems for the tests, always cleaned up, also on failure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from devices import loop
from devices.fs import mounts
from imager.demo import file_checksums, populate_sample

# Fault sweeps (kills at random moments, damaged images, ...) run in full under `make test-long`
# (IMAGER_TEST_LONG=1) and at a reduced size in `make test` and CI.
LONG = os.environ.get("IMAGER_TEST_LONG") == "1"


def sweep_size(full: int, reduced: int) -> int:
    """How many cases a sweep runs: `full` in the long run, `reduced` otherwise."""
    return full if LONG else reduced


def writing_into(pid: int, directory) -> bool:
    """Whether process `pid` holds a file open in `directory`: an image being written, named or
    unnamed (O_TMPFILE shows as "DIR/#NNN (deleted)")."""
    prefix = str(directory).rstrip("/") + "/"
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix):
                return True
        except OSError:
            continue
    return False


def run(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(list(cmd), capture_output=True, text=True, **kw)
    if check and done.returncode != 0:
        # The tool's own words, not only its exit status: a failed mkfs or mount in CI
        # must say why (device busy, too small, ...).
        raise AssertionError(f"{' '.join(cmd)} exited {done.returncode}: "
                             f"{(done.stderr or done.stdout).strip()[-2000:]}")
    return done


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def imager(*args: str, check: bool = False, **kw) -> subprocess.CompletedProcess:
    """Run the imager CLI as a user would, in a child process."""
    kw.setdefault("timeout", 300)
    return run(sys.executable, "-m", "imager.cli", *args, check=check, cwd=REPO_ROOT, **kw)


def unmount_everything_on(device: str) -> None:
    st = os.stat(device)
    for m in reversed(mounts()):
        if m.device_number == st.st_rdev:
            run("umount", "-l", m.mount_point, check=False)


class LoopFactory:
    """Creates sparse files attached as loop devices; tears every one of them down."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.devices: list[str] = []
        self.mount_points: list[Path] = []
        self._n = 0

    def create(self, size: int, *, fs: str | None = None, label: str = "imgtest", fill=None) -> str:
        self._n += 1
        path = self.directory / f"vol{self._n}.img"
        with open(path, "wb") as f:
            f.truncate(size)
        if fill is not None:
            fill(path)
        dev = loop.attach(str(path))
        self.devices.append(dev)
        if fs == "ext4":
            run("mkfs.ext4", "-q", "-F", "-L", label, dev)
        elif fs == "xfs":
            run("mkfs.xfs", "-q", "-f", "-L", label, dev)
        elif fs == "btrfs":
            run("mkfs.btrfs", "-q", "-f", "-L", label, dev)
        elif fs is not None:
            raise ValueError(fs)
        return dev

    def mount(self, device: str, *options: str) -> Path:
        point = self.directory / f"mnt{len(self.mount_points)}"
        point.mkdir(exist_ok=True)
        run("mount", *(["-o", ",".join(options)] if options else []), device, str(point))
        self.mount_points.append(point)
        return point

    def umount(self, point: Path) -> None:
        run("umount", str(point))
        self.mount_points.remove(point)

    def cleanup(self) -> None:
        for point in reversed(self.mount_points):
            if run("umount", str(point), check=False).returncode:
                run("umount", "-l", str(point), check=False)
        for dev in reversed(self.devices):
            try:
                unmount_everything_on(dev)
                loop.detach(dev)
            except Exception:
                pass


@pytest.fixture
def loops(tmp_path):
    factory = LoopFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture
def ext4_volume(loops):
    """A 256 MiB loop device holding an ext4 filesystem with real files; unmounted.
    Returns (device, {relative path: sha256})."""
    dev = loops.create(256 << 20, fs="ext4")
    point = loops.mount(dev)
    populate_sample(point)
    sums = file_checksums(point)
    loops.umount(point)
    return dev, sums


def fsck_clean(device: str, fs: str = "ext4") -> subprocess.CompletedProcess:
    if fs == "xfs":
        return run("xfs_repair", "-n", device, check=False)
    return run("fsck.ext4", "-n", "-f", device, check=False)


def same_bytes(a: str, b: str, length: int) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        remaining = length
        while remaining:
            n = min(remaining, 8 << 20)
            if fa.read(n) != fb.read(n):
                return False
            remaining -= n
    return True


def device_size(path: str) -> int:
    with open(path, "rb") as f:
        return f.seek(0, os.SEEK_END)


@pytest.fixture(autouse=True)
def private_catalog(tmp_path, monkeypatch):
    """Keep every test's catalog (the default one under XDG_DATA_HOME) out of the user's home."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    return tmp_path / "xdg-data" / "imager" / "catalog.sqlite"


@pytest.fixture
def lab(tmp_path, monkeypatch):
    """Loop devices, managed volumes and mounts, undone at teardown (tests/lab.py)."""
    from lab import lab_setup
    yield from lab_setup(tmp_path, monkeypatch)


@pytest.fixture
def bench(tmp_path, monkeypatch):
    """The lab plus writer processes, frozen filesystems and tmpfs mounts (tests/lab.py)."""
    from lab import bench_setup
    yield from bench_setup(tmp_path, monkeypatch)


def pytest_configure(config):
    config.addinivalue_line("markers", "st: needs a real st drive (and changer): make test-st runs it in the VM rig")


def pytest_collection_modifyitems(config, items):
    """IMAGER_TEST_ST_ONLY=1 (make test-st, inside the VM): keep only what the real drive adds,
    the tests on the `st` side of a drive parametrization (test_tape_drive's `medium`,
    test_tape_faults' `any_tape`) and those marked `st`; the rest runs in the suite outside."""
    if os.environ.get("IMAGER_TEST_ST_ONLY") != "1":
        return
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        on_st = any(value == "st" for value in params.values()) or item.get_closest_marker("st")
        (keep if on_st else drop).append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep
