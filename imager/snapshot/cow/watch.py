"""Writes to a managed volume's source that did not come through its front.

The change tracker marks what the front writes. Root can still write the source's node while it
is attached (`dd of=/dev/sdb`: the supervisor's O_EXCL claim stops mounts, not writes), and such
a write would be missing from the next tracked incremental. So the kernel reports every write
made to the source's disk (devices.tracefs), and each is checked against the tracker: a write
the daemon made covers only blocks it marked first, and stays marked until it is on the disk (a
roll writes everything back before it moves the marks). A write to any block not marked was
made by someone else: the series is not trusted any more, and a snapshot that exists is no
longer the volume as it was.

A loop device's backing file can be written without passing the loop device at all: for a
source on a loop device, a watch on that file (devices.fanotify) reports every write to it, and
the loop driver's own writes make no event, so any event is a write past the front.

The supervisor makes both before the first worker starts and ends them when the volume is
detached; workers read them in turn (the file watch's descriptor is passed on to each), so
nothing written between two workers goes unseen.
"""

from __future__ import annotations

import logging
import os
import threading

from devices import loop
from devices.errors import DeviceError
from devices.fanotify import FileWriteWatch
from devices.tracefs import TRACEFS, TraceUnavailable, WriteTrace, whole_disk

log = logging.getLogger(__name__)

# How often a worker reads the trace, so that its buffer never fills and a foreign write is
# reported (and a snapshot it spoils invalidated) soon after it is made. A buffer of 2 MiB a CPU
# holds some 35,000 events of 60 bytes: requests of up to MiBs each on a disk with request
# queues, and even on a bio-based disk, where the page cache's writeback is a 4 KiB bio an
# event, 136 MiB of it: read ten times a second, 1.3 GB/s a CPU. While events keep coming it is
# read again at once. IMAGER_WATCH_POLL sets the interval for measuring what the reads cost
# (bench/front.py).
POLL_INTERVAL = float(os.environ.get("IMAGER_WATCH_POLL", "0.1"))
BUSY_POLL_INTERVAL = 0.005
BUSY_EVENTS = 1000
TRACE_PREFIX = "imager-writes-"


def trace_name(volume: str) -> str:
    return TRACE_PREFIX + volume


class SourceWatch:
    def __init__(self, trace: WriteTrace, files: FileWriteWatch | None = None):
        self.trace = trace
        self.files = files
        self._lock = threading.Lock()
        self._last_count = 0

    @classmethod
    def open(cls, volume: str, device_path: str, file_watch_fd: int = -1, file_watch_path: str = "") -> "SourceWatch":
        """The supervisor's watches of `device_path`, read by this process from now on. Raises
        TraceUnavailable when they cannot be (then nothing tracked can be trusted past a roll)."""
        trace = WriteTrace(trace_name(volume), device_path)
        trace.open()
        return cls(trace, FileWriteWatch(file_watch_fd, file_watch_path) if file_watch_fd >= 0 else None)

    @property
    def busy(self) -> bool:
        """Whether the last read found many writes: more are likely on their way."""
        return self._last_count >= BUSY_EVENTS

    def foreign(self, first_unmarked) -> tuple[str, bool]:
        """Read what was written since the last call: what shows a write nobody marked, or that
        one may have gone unseen ("" when neither), and whether a write was seen.
        `first_unmarked(starts, ends)`: the index of the first byte range with a block the
        tracker did not mark, -1 for none. Writes still in the page cache are not seen yet:
        flush the source first for all of them."""
        with self._lock:
            problem = self.trace.problem()
            starts, ends = self.trace.writes()
            self._last_count = len(starts)
            writers, lost = self.files.events() if self.files is not None else ([], False)
            if writers:
                return (f"{self.files.path}, the file behind {self.trace.device_path}, was written outside the "
                        f"front while attached (by pid {writers[0]})"), True
            unmarked = first_unmarked(starts, ends)
            if unmarked >= 0:
                return (f"{self.trace.device_path} was written outside the front while attached "
                        f"({ends[unmarked] - starts[unmarked]} bytes at {starts[unmarked]})"), True
            if problem:
                return problem, False
            if lost:
                return f"the watch of writes to {self.files.path} lost events", False
            return "", False

    def close(self) -> None:
        with self._lock:
            self.trace.close()
            if self.files is not None:
                self.files.close()


def start_watches(volume: str, device_path: str) -> tuple[WriteTrace | None, FileWriteWatch | None, str]:
    """The supervisor's part: the trace of `device_path`'s disk and, for a loop device, the watch
    of its backing file, recording from now on; or (None, None, why not)."""
    try:
        trace = WriteTrace(trace_name(volume), device_path)
        trace.create()
    except (TraceUnavailable, OSError) as e:
        return None, None, str(e.strerror if e.strerror else e)
    try:
        backing = loop.served_file(whole_disk(trace.dev)[0])
        return trace, FileWriteWatch.create(backing) if backing is not None else None, ""
    except (DeviceError, OSError) as e:
        trace.remove()
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        return None, None, f"writes to the backing file of {device_path} cannot be watched: {why}"


def remove_trace(volume: str) -> None:
    """The trace a dead supervisor of `volume` left: it records for nobody, in kernel memory."""
    directory = os.path.join(TRACEFS, "instances", trace_name(volume))
    if os.path.isdir(directory):
        try:
            os.rmdir(directory)
        except OSError as e:
            log.warning("cannot remove %s: %s", directory, e.strerror)
