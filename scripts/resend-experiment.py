#!/usr/bin/env python3
"""Does a filesystem on a loop device on a FUSE file survive kill -9 of the FUSE server? (#15)

A supervisor mounts /dev/fuse, answers INIT and holds the descriptor; a worker process serves
one file (a plain backing file) on that descriptor with devices.fuse and starts by sending
FUSE_NOTIFY_RESEND. ext4 on a loop device (direct I/O) on that file is mounted, a writer writes,
renames and fsyncs generations of files, and the worker is killed with SIGKILL `--kills` times;
the supervisor starts a new one each time. At the end: did the writer see an error, is the
filesystem still read-write, does every fsync'd generation read back, is fsck clean, and did
the kernel log an I/O error for the loop device or the filesystem.

    python scripts/resend-experiment.py [--kills 30] [--size-mib 512] [--no-resend]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devices import fuse  # noqa: E402

MAX_WRITE = 1 << 20


class OneFile:
    """The served directory: `volume`, a backing file."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDWR)
        self.attr = fuse.Attr(2, os.fstat(self.fd).st_size, 0o100600, time.time_ns(), 4096)

    def listing(self):
        return {"volume": self.attr}

    def open(self, attr, writable, fh):
        pass

    def release(self, fh):
        pass

    def read_into(self, fh, dst, offset):
        return os.preadv(self.fd, [dst], offset)

    def write_from(self, fh, src, offset):
        return os.pwrite(self.fd, src, offset)

    def flush(self, fh):
        os.fsync(self.fd)

    def fsync(self, fh):
        os.fsync(self.fd)


def worker(fd: int, session: str, backing: str, report_fd: int) -> int:
    files = OneFile(backing)
    server = fuse.Server(fd, fuse.Session.from_arg(session), files)
    if os.environ.get("EXPERIMENT_RESEND", "1") == "1":
        fuse.resend(fd)
    # The first answered request: how long the connection went unserved.
    server.serve(on_first_reply=lambda: os.write(report_fd, f"{time.monotonic()}\n".encode()))
    return 0


def supervisor(mount_point: str, backing: str, report_fd: int, pid_file: str) -> int:
    fd = fuse.mount(mount_point, "resend-experiment", "experiment")
    session = fuse.negotiate(fd, MAX_WRITE)
    os.set_inheritable(fd, True)
    while True:
        child = subprocess.Popen([sys.executable, __file__, "worker", str(fd), session.to_arg(), backing,
                                  str(report_fd)], pass_fds=(fd, report_fd))
        Path(pid_file).write_text(str(child.pid))
        code = child.wait()
        if code == 0:
            return 0          # unmounted: the worker saw the connection end
        print(f"supervisor: worker {child.pid} ended ({code}); starting another", file=sys.stderr)


WRITER = r"""
import hashlib, os, random, sys
root, log = sys.argv[1], sys.argv[2]
big = os.open(os.path.join(root, "big"), os.O_RDWR | os.O_CREAT, 0o600)
os.ftruncate(big, 64 << 20)
logf = open(log, "a")
n = 0
while not os.path.exists(os.path.join(root, "stop")):
    data = os.urandom(random.choice((4096, 65536, 1 << 20)))
    tmp = os.path.join(root, f"g{n}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, os.path.join(root, f"g{n}"))
    d = os.open(root, os.O_RDONLY)
    os.fsync(d)
    os.close(d)
    os.pwrite(big, os.urandom(4096), random.randrange(16384) * 4096)
    os.fdatasync(big)
    logf.write(f"{n} {hashlib.sha256(data).hexdigest()}\n")
    logf.flush()
    n += 1
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=30)
    p.add_argument("--size-mib", type=int, default=512)
    p.add_argument("--no-resend", action="store_true", help="the control: workers do not send FUSE_NOTIFY_RESEND")
    args = p.parse_args()
    os.environ["EXPERIMENT_RESEND"] = "0" if args.no_resend else "1"
    tmp = Path(tempfile.mkdtemp(prefix="resend-"))
    mnt, fsmnt = tmp / "fuse", tmp / "fs"
    mnt.mkdir()
    fsmnt.mkdir()
    backing = tmp / "backing.img"
    with open(backing, "wb") as f:
        f.truncate(args.size_mib << 20)
    report_r, report_w = os.pipe()
    pid_file = tmp / "worker.pid"
    since = _kernel_log()[-1][0] if _kernel_log() else 0.0
    sup = subprocess.Popen([sys.executable, __file__, "supervisor", str(mnt), str(backing), str(report_w),
                            str(pid_file)], pass_fds=(report_w,))
    os.close(report_w)
    front = writer = None
    fs_mounted = False
    ok = True
    try:
        _wait_for(lambda: (mnt / "volume").exists(), "the FUSE mount")
        front = subprocess.run(["losetup", "--direct-io=on", "-f", "--show", str(mnt / "volume")],
                               check=True, capture_output=True, text=True).stdout.strip()
        subprocess.run(["mkfs.ext4", "-q", "-F", front], check=True)
        subprocess.run(["mount", front, str(fsmnt)], check=True)
        fs_mounted = True
        log = tmp / "writer.log"
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(fsmnt), str(log)])
        _drain(report_r)
        gaps = []
        for i in range(args.kills):
            before = _lines(log)
            _wait_for(lambda: _lines(log) > before, "the writer's progress")      # it runs between kills
            time.sleep(random.uniform(0, 0.2))         # a random moment of the writer's cycle
            pid = int(pid_file.read_text())
            killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            served_at = _next_report(report_r)
            gaps.append(served_at - killed_at)
            if writer.poll() is not None:
                print(f"kill {i + 1}: the writer exited with {writer.returncode}")
                ok = False
                break
        (fsmnt / "stop").touch()
        code = writer.wait(60)
        print(f"writer exit code {code} after {_lines(log)} generations")
        ok &= code == 0
        options = next(line.split()[3] for line in open("/proc/mounts") if line.split()[1] == str(fsmnt))
        print(f"mount options at the end: {options}")
        ok &= options.split(",")[0] == "rw"
        missing = bad = 0
        for line in log.read_text().splitlines():
            n, digest = line.split()
            try:
                bad += hashlib.sha256((fsmnt / f"g{n}").read_bytes()).hexdigest() != digest
            except FileNotFoundError:
                missing += 1
        print(f"generations: {_lines(log)} logged, {missing} missing, {bad} with other contents")
        ok &= missing == 0 and bad == 0
        subprocess.run(["umount", str(fsmnt)], check=True)
        fs_mounted = False
        fsck = subprocess.run(["e2fsck", "-fn", front], capture_output=True, text=True)
        print(f"e2fsck -fn: exit {fsck.returncode}")
        ok &= fsck.returncode == 0
        if gaps:
            print(f"kills: {len(gaps)}; death to first reply: median {statistics.median(gaps) * 1e3:.0f} ms, "
                  f"max {max(gaps) * 1e3:.0f} ms")
    finally:
        until = _kernel_log()[-1][0]
        if writer is not None and writer.poll() is None:
            writer.kill()
        if fs_mounted:
            subprocess.run(["umount", "-l", str(fsmnt)])
        if front:
            subprocess.run(["losetup", "-d", front])
        subprocess.run(["umount", str(mnt)])
        try:
            sup.wait(30)
        except subprocess.TimeoutExpired:
            sup.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    name = os.path.basename(front or "loop?")
    # Only this run's lines: the ring buffer rotates, and other users of the machine reuse loop names.
    new = [line for t, line in _kernel_log() if since < t <= until and (name + ")" in line or name + ":" in line)]
    errors = [line for line in new if any(w in line.lower() for w in ("error", "read-only", "remount"))]
    print(f"kernel log lines about {name} during the run: {len(new)}, errors among them: {len(errors)}")
    for line in new[:4]:
        print("  " + line)
    for line in errors[:10]:
        print("  " + line)
    ok &= not errors
    print("SURVIVED" if ok else "FAILED")
    return 0 if ok else 1


def _kernel_log() -> list[tuple[float, str]]:
    lines = subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout.splitlines()
    return [(float(line[1:line.index("]")]), line) for line in lines if line.startswith("[")]


def _lines(path: Path) -> int:
    try:
        return len(path.read_text().splitlines())
    except FileNotFoundError:
        return 0


def _drain(fd: int) -> None:
    while select.select([fd], [], [], 0)[0]:
        os.read(fd, 4096)


def _next_report(fd: int) -> float:
    line = b""
    while not line.endswith(b"\n"):
        if not select.select([fd], [], [], 60)[0]:
            raise TimeoutError("no worker served a request within 60 s of the kill")
        line += os.read(fd, 1)
    return float(line)


def _wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.01)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        sys.exit(worker(int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])))
    if len(sys.argv) > 1 and sys.argv[1] == "supervisor":
        sys.exit(supervisor(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]))
    sys.exit(main())
