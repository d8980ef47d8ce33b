"""The freeze guard process: holds the FIFREEZEs of one freeze window and thaws on every way out
(see imager.snapshot.freeze, the job's side).

It is started for every snapshot, before the freeze, so it imports nothing but the standard
library and devices.freeze, and runs without site (python -S): a bare interpreter starts in a
quarter of the time.

    python -S -m imager.snapshot.freeze_guard      (JSON lines on stdin and stdout)
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time

from devices.errors import DeviceError
from devices.freeze import freeze, thaw

# Where the job records what it asks a guard to freeze (FROZEN_DIR/<guard's pid>.json), which
# the guard removes once it has thawed: if the guard is killed too (kill -9 of both), the next
# freeze of imager thaws what the record names (imager.snapshot.freeze.thaw_left_over).
FROZEN_DIR = "frozen"


def frozen_dir() -> str:
    return os.path.join(os.environ.get("IMAGER_RUN_DIR") or "/run/imager", FROZEN_DIR)


def frozen_record(guard_pid: int) -> str:
    return os.path.join(frozen_dir(), f"{guard_pid}.json")


def _leave_the_jobs_cgroup() -> None:
    """Into the root cgroup of the hierarchies systemd kills by (cgroup2, and the legacy
    name=systemd one of a hybrid setup): stopping the job's service unit kills every process of
    its cgroup with SIGKILL, and the guard must outlive the job to thaw (it lives only while it
    holds a freeze). Only where such a filesystem is mounted (/proc/self/mountinfo), and never
    creating a file; where one refuses, the guard stays where it is."""
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, kind = left.split(), right.split()
        if len(fields) < 5 or len(kind) < 3:
            continue
        if kind[0] == "cgroup2" or (kind[0] == "cgroup" and "name=systemd" in kind[2].split(",")):
            try:
                fd = os.open(os.path.join(fields[4], "cgroup.procs"), os.O_WRONLY)
            except OSError:
                continue
            try:
                os.write(fd, str(os.getpid()).encode())
            except OSError:
                pass
            finally:
                os.close(fd)


class _Guard:
    """The guard's side: holds the freezes, thaws on any way out (see the module docstring)."""

    def __init__(self) -> None:
        self.out = sys.stdout.buffer
        self.frozen: list[str] = []
        self.started = 0.0
        self.deadline: float | None = None
        self.expired: dict | None = None

    def reply(self, message: dict) -> None:
        try:
            self.out.write(json.dumps(message).encode() + b"\n")
            self.out.flush()
        except OSError:
            pass  # the job is gone: thawing is all that is left to do

    def thaw_all(self) -> dict:
        failures = []
        for point in reversed(self.frozen):
            try:
                thaw(point)
            except DeviceError as e:
                failures.append(str(e))
        milliseconds = (time.perf_counter() - self.started) * 1000.0 if self.frozen else 0.0
        self.frozen.clear()
        self.deadline = None
        if not failures:
            try:
                os.unlink(frozen_record(os.getpid()))
            except OSError:
                pass
        return {"milliseconds": milliseconds, "failures": failures}

    def freeze(self, mount_points: list[str], max_seconds: float) -> None:
        self.started = time.perf_counter()
        self.deadline = time.monotonic() + max_seconds
        try:
            for point in mount_points:
                freeze(point)
                self.frozen.append(point)
        except DeviceError as e:
            self.thaw_all()
            self.reply({"ok": False, "error": str(e)})
            return
        self.reply({"ok": True, "frozen": list(self.frozen)})

    def serve(self) -> int:
        stdin = sys.stdin.buffer
        self.reply({"ready": True})
        while True:
            timeout = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
            if not select.select([stdin], [], [], timeout)[0]:
                # The window outlived its maximum: thaw whatever the job is doing, and tell it.
                self.expired = dict(self.thaw_all(), expired=True)
                self.reply(self.expired)
                continue
            line = stdin.readline()
            if not line:
                self.thaw_all()   # the job ended, normally or not
                return 0
            request = json.loads(line)
            if request["op"] == "freeze":
                self.freeze(request["mount_points"], float(request["max_seconds"]))
            elif request["op"] == "thaw":
                self.reply(self.expired if self.expired is not None else dict(self.thaw_all(), ok=True))
                return 0


def main() -> int:
    _leave_the_jobs_cgroup()
    guard = _Guard()

    def on_signal(signum, frame):
        guard.thaw_all()
        os._exit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(signum, on_signal)
    return guard.serve()


if __name__ == "__main__":
    sys.exit(main())
