"""Every write the block layer is asked to make to one block device, whoever makes it: a
tracepoint of the kernel's, recorded in a tracing instance of its own (tracefs).

On a disk with request queues (blk-mq: SCSI, NVMe, virtio, loop) every write reaches the driver
as a request, merged from the bios that make it: block_rq_issue reports each. The page cache
writes a block device back one 4 KiB bio at a time, so 64 MiB written back is 16,384 bios and
some 130 requests. A bio-based disk (device-mapper, md) has no requests: there block_bio_queue
reports each bio as it is submitted. Both come after a partition's I/O is remapped onto the
whole disk, so one instance per disk sees writes through a partition's node, through the
whole disk's node and from the page cache's writeback alike (sectors are the whole disk's).
Only writes are recorded (the filter drops reads in the kernel). Not seen: SCSI commands a
program sends itself (SG_IO): their requests carry no sectors to check. An instance outlives the
process that made it; its trace_pipe has one reader at a time (a second open fails with EBUSY),
and what nobody reads waits in the instance's buffer, or is counted as dropped once that is
full.

Debugfs and blktrace are not used: under kernel lockdown (Secure Boot) debugfs refuses them,
and tracefs stays readable.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import stat

import numpy as np

from .libc import check, libc

TRACEFS = "/sys/kernel/tracing"
REQUESTS = "block_rq_issue"
BIOS = "block_bio_queue"
# Per CPU. Events are about 40 bytes in the buffer: tens of thousands between two reads.
BUFFER_KB = 2048
_LINES = {
    REQUESTS: re.compile(rb"block_rq_issue: \d+,\d+ \S+ \d+ \([^)]*\) (\d+) \+ (\d+)"),
    BIOS: re.compile(rb"block_bio_queue: \d+,\d+ \S+ (\d+) \+ (\d+)"),
}


class TraceUnavailable(OSError):
    """Writes to the device cannot be traced here (no tracefs, not permitted, one of the same
    name is being read)."""


def whole_disk(dev: int) -> tuple[int, int]:
    """The whole disk's device number and the partition's first sector (0 for a disk)."""
    sysfs = os.path.realpath(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if not os.path.exists(os.path.join(sysfs, "partition")):
        return dev, 0
    with open(os.path.join(sysfs, "start")) as f:
        start = int(f.read())
    with open(os.path.join(os.path.dirname(sysfs), "dev")) as f:
        major, minor = f.read().strip().split(":")
    return os.makedev(int(major), int(minor)), start


def _mounted() -> bool:
    return os.path.isdir(os.path.join(TRACEFS, "instances"))


def _mount() -> None:
    if _mounted():
        return
    try:
        check(libc.mount(b"tracefs", TRACEFS.encode(), b"tracefs", ctypes.c_ulong(0), None), "mount tracefs")
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise TraceUnavailable(e.errno, f"tracefs cannot be mounted at {TRACEFS}: {e.strerror}") from None
    if not _mounted():
        raise TraceUnavailable(errno.ENOENT, f"no tracing instances under {TRACEFS}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


class WriteTrace:
    """The tracing instance `name` recording the writes to one block device (a disk or a
    partition of one). create() makes it; open() reads it, in this process or in another."""

    def __init__(self, name: str, device_path: str, event: str | None = None):
        self.name = name
        self.device_path = device_path
        self.directory = os.path.join(TRACEFS, "instances", name)
        st = os.stat(device_path)
        if not stat.S_ISBLK(st.st_mode):
            raise TraceUnavailable(errno.ENOTBLK, f"{device_path} is not a block device")
        self.dev = st.st_rdev
        self.disk, self.start = whole_disk(st.st_rdev)
        self.size_sectors = int(_read(f"/sys/dev/block/{os.major(self.dev)}:{os.minor(self.dev)}/size"))
        # A read's rwbs starts with R (a read has no preflush, the only flag before the op). Not
        # "*R*": the kernel matches that over the whole char[10], past the string's end, where
        # stale bytes made block_bio_queue drop every write here.
        self.filter = f'dev == {(os.major(self.disk) << 20) | os.minor(self.disk)} && !(rwbs ~ "R*")'
        disk_sysfs = f"/sys/dev/block/{os.major(self.disk)}:{os.minor(self.disk)}"
        # `event` chooses it (the tests read both events of one loop device).
        self.event = event or (REQUESTS if os.path.isdir(os.path.join(disk_sysfs, "mq")) else BIOS)
        self._event_dir = os.path.join("events", "block", self.event)
        self._line = _LINES[self.event]
        self._pipe = -1
        self._rest = b""
        self._lost_seen = 0         # events the kernel had dropped when problem() last said so

    # -- the instance ------------------------------------------------------------------------------

    def create(self) -> None:
        """Make the instance, recording from now on. One left by a process that died is removed
        first (its events are of no use to anyone)."""
        _mount()
        self.remove()
        try:
            os.mkdir(self.directory)
            _write(os.path.join(self.directory, "buffer_size_kb"), str(BUFFER_KB))
            # A full buffer drops new events, and counts them: nothing is overwritten unseen.
            _write(os.path.join(self.directory, "options", "overwrite"), "0")
            # Only the event's own text: no task, CPU or time to format and parse.
            _write(os.path.join(self.directory, "options", "context-info"), "0")
            _write(os.path.join(self.directory, self._event_dir, "filter"), self.filter)
            _write(os.path.join(self.directory, self._event_dir, "enable"), "1")
            _write(os.path.join(self.directory, "tracing_on"), "1")
        except OSError as e:
            try:
                self.remove()
            except OSError:
                pass
            raise TraceUnavailable(e.errno, f"cannot trace the writes to {self.device_path} "
                                            f"({self.directory}): {e.strerror}") from None

    def remove(self) -> None:
        """Remove the instance (nothing if there is none). Fails with EBUSY while it is read."""
        if not os.path.isdir(self.directory):
            return
        try:
            _write(os.path.join(self.directory, self._event_dir, "enable"), "0")
        except OSError:
            pass
        try:
            os.rmdir(self.directory)
        except FileNotFoundError:
            pass

    def problem(self) -> str:
        """What kept the instance from recording every write since the last call ("" when
        nothing did): it is gone, was switched off or filtered otherwise, or dropped events (the
        kernel's count only grows: a loss is said once)."""
        try:
            if _read(os.path.join(self.directory, "tracing_on")) != "1" or \
                    _read(os.path.join(self.directory, self._event_dir, "enable")) != "1":
                return f"the trace of writes to {self.device_path} was switched off ({self.directory})"
            if _read(os.path.join(self.directory, self._event_dir, "filter")) != self.filter:
                return f"the trace of writes to {self.device_path} was changed ({self.directory})"
            lost = 0
            per_cpu = os.path.join(self.directory, "per_cpu")
            for cpu in os.listdir(per_cpu):
                with open(os.path.join(per_cpu, cpu, "stats")) as f:
                    for line in f:
                        key, _, value = line.partition(":")
                        if key in ("overrun", "dropped events"):
                            lost += int(value)
            if lost > self._lost_seen:
                new, self._lost_seen = lost - self._lost_seen, lost
                return f"the trace of writes to {self.device_path} lost {new} events (its buffer was full)"
        except (OSError, ValueError) as e:
            return f"the trace of writes to {self.device_path} cannot be read ({self.directory}: " \
                   f"{getattr(e, 'strerror', None) or e})"
        return ""

    # -- reading -----------------------------------------------------------------------------------

    def open(self) -> None:
        """Become the instance's one reader."""
        try:
            self._pipe = os.open(os.path.join(self.directory, "trace_pipe"), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            why = "another process reads it" if e.errno == errno.EBUSY else e.strerror
            raise TraceUnavailable(e.errno, f"cannot read the trace of writes to {self.device_path} "
                                            f"({self.directory}): {why}") from None

    def close(self) -> None:
        if self._pipe >= 0:
            os.close(self._pipe)
            self._pipe = -1

    def writes(self) -> tuple[np.ndarray, np.ndarray]:
        """The writes to this device recorded since the last call (all of them: this returns once
        the buffer is empty), as the bytes [starts[i], ends[i]) of the device each covers.
        Writes to the rest of its disk are left out."""
        data = bytearray(self._rest)
        while True:
            try:
                chunk = os.read(self._pipe, 1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
        end = data.rfind(b"\n") + 1
        self._rest = bytes(data[end:])
        found = self._line.findall(data, 0, end)
        if not found:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        sectors, counts = np.array(found).astype(np.int64).T
        first = sectors - self.start
        last = first + counts
        keep = (counts > 0) & (last > 0) & (first < self.size_sectors)
        return np.maximum(first[keep], 0) * 512, np.minimum(last[keep], self.size_sectors) * 512
